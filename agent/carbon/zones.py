"""Zone resolution: ``--zone FR``, ``US-CA``, ``CAMX``, ``--cloud aws:us-east-1``.

Never probes the network: a zone is only ever what the user (or config) named. Unknown names
raise :class:`UsageError` with the closest valid names, found with :mod:`difflib`.
"""
from __future__ import annotations

import difflib
import functools
import re
from typing import Iterable

from ..errors import UsageError
from .tables import WORLD_KEY, ZoneInfo, cloud_providers, load_table, zone_index

_HELP = ("zones are ISO country codes (FR), US states (US-CA), eGRID subregions (CAMX) or cloud "
         "regions (aws:us-east-1); see docs/carbon.md")


def _natural(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def suggest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Closest candidates to ``word``, case-insensitively; prefix matches first."""
    by_lower: dict[str, str] = {}
    for c in candidates:
        by_lower.setdefault(c.lower(), c)
    w = word.lower()
    prefix = [by_lower[c] for c in sorted(by_lower, key=_natural) if len(w) >= 2 and c.startswith(w)]
    matcher = difflib.SequenceMatcher(b=w)
    scored = []
    for c in by_lower:
        matcher.set_seq1(c)
        if matcher.real_quick_ratio() >= 0.5 and matcher.quick_ratio() >= 0.5 and matcher.ratio() >= 0.5:
            scored.append((-matcher.ratio(), _natural(c), c))
    close = [by_lower[c] for _, _, c in sorted(scored)[:n]]   # ties: europe-west1 before europe-west9
    out: list[str] = []
    for c in close + prefix:
        if c not in out:
            out.append(c)
    return out[:n]


@functools.lru_cache(maxsize=None)
def _aliases() -> dict[str, str]:
    """Lower-cased alternative spellings -> canonical key (ISO-3, country names, US-CAMX...)."""
    out: dict[str, str] = {}
    for key, zone in zone_index().items():
        out[key.lower()] = key
        if zone.kind == "egrid":
            out[f"us-{key.lower()}"] = key
            out[f"egrid:{key.lower()}"] = key
        if zone.kind in ("country", "world"):
            out.setdefault(zone.name.lower(), key)
    for key, row in load_table("countries")["zones"].items():
        out.setdefault(str(row.get("iso3", "")).lower(), key)
    out.update({"world": WORLD_KEY, "uk": "GB", "usa": "US"})
    out.pop("", None)
    return out


def _describe(keys: list[str]) -> str:
    index = zone_index()
    parts = []
    for k in keys:
        zone = index.get(k)
        parts.append(f"{k} ({zone.name})" if zone is not None and zone.kind != "cloud" else k)
    return ", ".join(parts)


def resolve_zone(spec: str, *, allow_subzone: bool = False) -> ZoneInfo:
    """The zone named by ``spec``. ``allow_subzone`` accepts live-provider zones such as
    ``US-CAL-CISO`` or ``DK-DK1`` by falling back to their country's table row."""
    text = spec.strip()
    if not text:
        raise UsageError(f"empty zone; {_HELP}")
    if ":" in text and text.split(":", 1)[0].lower() in cloud_providers():
        return resolve_cloud(text)
    key = _aliases().get(text.lower())
    if key is not None:
        return zone_index()[key]
    country = text.split("-", 1)[0]
    if allow_subzone and "-" in text and country.upper() in zone_index():
        base = zone_index()[country.upper()]
        return ZoneInfo(text, f"{text} (table fallback: {base.name})", base.kind, base.g_per_kwh,
                        base.year, base.dataset, base.country)
    names = suggest(text, list(zone_index()) + [a for a in _aliases() if len(a) > 3])
    keys = []
    for name in names:
        k = _aliases().get(name.lower(), name)
        if k not in keys:
            keys.append(k)
    hint = f"; closest: {_describe(keys)}" if keys else ""
    raise UsageError(f"unknown zone {text!r}{hint}; {_HELP}")


def resolve_cloud(spec: str) -> ZoneInfo:
    """``PROVIDER:REGION``, e.g. ``aws:us-east-1``, ``gcp:europe-west1``, ``azure:westeurope``."""
    text = spec.strip()
    providers = cloud_providers()
    if ":" not in text:
        raise UsageError(f"cloud region {text!r} needs a provider prefix, e.g. aws:{text or 'us-east-1'}; "
                         f"providers: {', '.join(providers)}")
    provider, region = (p.strip() for p in text.split(":", 1))
    provider = provider.lower()
    if provider not in providers:
        close = suggest(provider, providers) or providers
        raise UsageError(f"unknown cloud provider {provider!r} in {text!r}; closest: {', '.join(close)}")
    regions = load_table("cloud_regions")["providers"][provider]["regions"]
    wanted = region.lower().replace(" ", "")
    for name in regions:
        if name.lower() == wanted:
            return zone_index()[f"{provider}:{name}"]
    close = suggest(wanted, regions)
    hint = f"; closest: {', '.join(f'{provider}:{c}' for c in close)}" if close else ""
    raise UsageError(f"unknown cloud region {text!r}{hint}; the table lists {len(regions)} "
                     f"{provider} regions (docs/carbon.md)")


def resolve(zone: str | None, cloud: str | None, *, allow_subzone: bool = False) -> ZoneInfo | None:
    """The zone whose intensity applies: an explicit ``zone`` wins over the cloud region's own."""
    if zone:
        return resolve_zone(zone, allow_subzone=allow_subzone)
    if cloud:
        return resolve_cloud(cloud)
    return None


def world() -> ZoneInfo:
    return zone_index()[WORLD_KEY]

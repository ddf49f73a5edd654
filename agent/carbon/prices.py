"""Cost beside carbon: a price per kWh from ``--price-per-kwh`` or the per-zone table.

The table (``data/prices.json``) carries each value's source and year, like the intensity
tables. It holds averages (EIA state averages, Eurostat non-household prices), not tariffs;
a user's own contract price is ``--price-per-kwh 0.12USD``. Cost applies to facility energy
(IT kWh x PUE): the utility bills what the building draws.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .tables import load_table

_PRICE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]{3})?\s*$")


@dataclass(frozen=True)
class Price:
    per_kwh: float
    currency: str
    source: str            # "--price-per-kwh" or "table:eia-2023 (U.S. EIA ...)"
    year: int | None = None

    def cost(self, kwh: float) -> float:
        return kwh * self.per_kwh

    def as_dict(self) -> dict[str, Any]:
        return {"price_per_kwh": self.per_kwh, "currency": self.currency, "source": self.source, "year": self.year}


def parse_price(text: str, flag: str = "--price-per-kwh") -> Price:
    """``0.12``, ``0.12USD`` or ``0.25 EUR``. The currency defaults to USD."""
    m = _PRICE.match(str(text))
    if not m:
        raise UsageError(f"{flag} {text!r} is not a price; give a number with an optional currency, e.g. 0.12 or 0.25EUR")
    value = float(m.group(1))
    if not value > 0:
        raise UsageError(f"{flag} {text!r} must be above 0, e.g. 0.12")
    return Price(value, (m.group(2) or "USD").upper(), flag)


def table_price(zone_key: str) -> Price | None:
    """The table's price for a zone key (``US-CA``, ``FI``), or None when the table has none."""
    table = load_table("prices")
    row = table["zones"].get(zone_key)
    if row is None:
        return None
    meta = table["_meta"]["sources"][row["dataset"]]
    return Price(float(row["price_per_kwh"]), row["currency"], f"table:{row['dataset']}", int(meta["year"]))


def price_zones() -> list[str]:
    return sorted(load_table("prices")["zones"])


def resolve_price(flag_value: str | None, zone_key: str | None) -> Price | None:
    """The flag wins; else the zone's table row; else None (cost not shown)."""
    if flag_value is not None:
        return parse_price(flag_value)
    return table_price(zone_key) if zone_key else None


def render_cost(price: Price, kwh: float) -> str:
    year = f", {price.year}" if price.year else ""
    return f"{price.cost(kwh):,.2f} {price.currency} ({kwh:,.3f} kWh x {price.per_kwh:g} {price.currency}/kWh, {price.source}{year})"

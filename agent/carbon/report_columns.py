"""Value and cost columns for the CSV and CodeCarbon report formats.

The table, Markdown and JSON formats show value per kWh, value per kg CO2e and energy cost in
their "value and cost" section (``decisions.decision_chunks``); these are the same figures as
columns, so the machine-readable formats carry them too:

- ``value_<unit>``, ``value_<unit>_per_kwh`` (IT kWh), ``value_<unit>_per_kg_co2e`` (location-based)
  for every unit any run has (tokens count automatically);
- ``price_per_kwh``, ``currency``, ``price_source`` and ``cost``: ``--price-per-kwh`` or the
  run's zone row in ``data/prices.json``; cost is IT kWh x PUE x price (the utility bills what
  the building draws).

Group and total rows sum their runs. Their cost is left empty unless every run in them has a
price in one currency: a partial sum would read as the whole cost.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .accounting import J_PER_KWH
from .prices import Price, table_price

COST_COLUMNS = ["price_per_kwh", "currency", "price_source", "cost"]


def value_columns(units: Sequence[str]) -> list[str]:
    return [c for u in units for c in (f"value_{u}", f"value_{u}_per_kwh", f"value_{u}_per_kg_co2e")]


@dataclass
class _Sums:
    value: dict[str, float] = field(default_factory=dict)
    kwh: float = 0.0
    kg: float = 0.0
    cost: float = 0.0
    prices: set[tuple[float, str, str]] = field(default_factory=set)
    unpriced: int = 0

    def add(self, value: Mapping[str, float], kwh: float, kg: float | None, price: Price | None,
            cost: float | None) -> None:
        for unit, n in value.items():
            self.value[unit] = self.value.get(unit, 0.0) + n
        self.kwh += kwh
        self.kg += kg or 0.0
        if price is None or cost is None:
            self.unpriced += 1
        else:
            self.cost += cost
            self.prices.add((price.per_kwh, price.currency, price.source))


class DecisionColumns:
    """The extra columns of one report. ``run(...)`` is called for every run before ``group()``
    and ``total()`` are read (the CSV writes runs first), so the sums build in the same pass."""

    def __init__(self, units: Sequence[str], value_of: Callable[[str], Mapping[str, Any] | None], group_by: str,
                 price: Price | None = None) -> None:
        self.units = list(units)
        self.columns = value_columns(self.units) + COST_COLUMNS
        self._value_of = value_of              # run_id -> the run record's ``value`` (rows keep none)
        self._group_by = group_by
        self._price = price
        self._zone_prices: dict[str | None, Price | None] = {}
        self._groups: dict[str, _Sums] = {}
        self._total = _Sums()
        self._no_value = [""] * (3 * len(self.units))

    def _price_for(self, zone: str | None) -> Price | None:
        if self._price is not None:
            return self._price
        if zone not in self._zone_prices:
            self._zone_prices[zone] = table_price(zone) if zone else None
        return self._zone_prices[zone]

    def run(self, run_id: str, group: str, zone: str | None, pue: float | None, energy_j: float, tokens: int,
            location_g: float | None) -> list[Any]:
        """One run's cells, in :attr:`columns` order ("" where empty), from the row's stored
        fields: the figures of value.record_value/record_kwh/record_kg_co2e. This runs once per
        run of a 200k-run report, so the common case (no value field) builds no dict."""
        found = self._value_of(run_id)
        value = {str(u): float(n) for u, n in found.items() if type(n) in (int, float)} if found else {}
        if tokens and "tokens" not in value:
            value["tokens"] = float(tokens)           # tokens count as value automatically
        kwh = energy_j / J_PER_KWH
        kg = location_g / 1000.0 if location_g is not None else None
        price = self._price_for(zone)
        cost = price.cost(kwh * (pue or 1.0)) if price is not None else None
        sums = self._groups.get(group)
        if sums is None:
            sums = self._groups[group] = _Sums()
        sums.add(value, kwh, kg, price, cost)
        self._total.add(value, kwh, kg, price, cost)
        cells = self._value_list(value, kwh, kg) if value else list(self._no_value)
        if price is not None:
            cells += (price.per_kwh, price.currency, price.source, cost)
        else:
            cells += ("", "", "", "")
        return cells

    def _value_list(self, value: Mapping[str, float], kwh: float, kg: float | None) -> list[Any]:
        out: list[Any] = []
        for unit in self.units:
            n = value.get(unit)
            if n is None:
                out += ("", "", "")
            else:
                out += (n, n / kwh if kwh > 0 else None, n / kg if kg else None)
        return out

    def group(self, key: str) -> dict[str, Any]:
        return self._sum_cells(self._groups.get(key, _Sums()))

    def total(self) -> dict[str, Any]:
        return self._sum_cells(self._total)

    def _value_cells(self, value: Mapping[str, float], kwh: float, kg: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for unit, n in value.items():
            if unit not in self.units:
                continue
            out[f"value_{unit}"] = n
            out[f"value_{unit}_per_kwh"] = n / kwh if kwh > 0 else None
            out[f"value_{unit}_per_kg_co2e"] = n / kg if kg else None
        return out

    def _sum_cells(self, s: _Sums) -> dict[str, Any]:
        out = self._value_cells(s.value, s.kwh, s.kg or None)
        if len(s.prices) == 1 and not s.unpriced:
            per_kwh, currency, source = next(iter(s.prices))
            out.update(price_per_kwh=per_kwh, currency=currency, price_source=source, cost=s.cost)
        elif len({c for _, c, _ in s.prices}) == 1 and not s.unpriced:     # one currency, several prices
            out.update(currency=next(iter(s.prices))[1], price_source="several", cost=s.cost)
        elif s.prices:
            out["price_source"] = "mixed currencies" if len({c for _, c, _ in s.prices}) > 1 else \
                f"{s.unpriced} run(s) without a price"
        return out

"""Carbon of a Python-API window with the settings ``wattmeter run`` takes (zone, cloud, PUE,
renewable share), as keyword arguments:

    from wattmeter.carbon.window import window_carbon
    with wattmeter.measure("epoch") as w:
        train_one_epoch()
    print(window_carbon(w.result(), zone="FR", pue=1.2).summary())

Table intensity (the offline datasets of docs/carbon.md); the same checks as the flags.
"""
from __future__ import annotations

from ..model import Component, WindowResult
from .accounting import J_PER_KWH, CarbonResult, build_result, emissions_g
from .config import CarbonConfig
from .intensity import IntensityReading


def window_carbon(result: WindowResult, *, zone: str | None = None, cloud: str | None = None,
                  pue: float | None = None, renewable_share: float | None = None) -> CarbonResult:
    """Location-based (and, with ``renewable_share``, market-based) CO2e of ``result``.

    Without ``zone`` or ``cloud`` the world average applies and the result says so
    (``intensity_source == "table:world-default"``), as in ``run``.
    """
    config = CarbonConfig(zone=zone, cloud=cloud, pue=pue, renewable_share=renewable_share).validate()
    where = config.zone_info()
    factor = config.effective_pue()
    energy_j = result.total_energy_j
    gpus = sum(1 for d in result.devices if d.component == Component.GPU)
    reading = IntensityReading(where.g_per_kwh, where.source_label, where.key)
    return build_result(config, where, factor, energy_j / J_PER_KWH,
                        emissions_g(energy_j, where.g_per_kwh, factor), reading,
                        device_hours=gpus * result.duration_s / 3600.0)

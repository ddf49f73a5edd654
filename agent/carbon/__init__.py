"""Carbon accounting: zones and offline tables, live intensity providers, scopes, reports, estimates.

See docs/carbon.md and docs/report.md. Nothing here is imported by ``import wattmeter``.
"""

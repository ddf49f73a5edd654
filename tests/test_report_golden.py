"""Every report format, byte for byte, over records with every kind of gap and oddity.

The golden files under fixtures/records/golden were written by the report as it was before the
formats were made to render straight from the stored columns (commit 2e85915: a JobRow, a
record dict and a csv.DictWriter row per run). The rewrite must not move a byte: the numbers in
them are checked by hand in test_report.py and test_report_columns.py; this test pins the rest
(None cells, quoting, escaping, NaN-free JSON, SIMULATED and checkpoint marks, missing carbon,
several scopes, water, value and cost columns, what-if columns, skipped lines).

varied.jsonl: 63 runs with missing or odd fields (no carbon, carbon {}, no end_unix, no start,
several scopes, water, value; names with commas, quotes, pipes, newlines, CRs, NULs and non-ASCII
letters; some absurd), 22 lines each skipped for a different reason, then realistic.jsonl:
37 lines are skipped in all.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from wattmeter.cli import main

RECORDS = Path(__file__).resolve().parent / "fixtures" / "records"
OPTIONS = {"default": [], "team-whatif": ["--group-by", "team", "--what-if", "FR,PL"],
           "day-price": ["--group-by", "day", "--price-per-kwh", "0.25EUR"]}
CASES = sorted(p.name for p in (RECORDS / "golden").iterdir())


@pytest.mark.parametrize("name", CASES)
def test_format_is_byte_identical_to_the_golden_file(name, monkeypatch, capsys):
    for var in list(os.environ):
        if var.startswith("WATTMETER_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(RECORDS)               # the paths in the output are as given: relative
    _, options, fmt = name.split(".")
    assert main(["report", "varied.jsonl", "--format", fmt, *OPTIONS[options]]) == 0
    out, err = capsys.readouterr()
    assert out == (RECORDS / "golden" / name).read_bytes().decode("utf-8")    # CRs in cells stay CRs
    assert err.startswith("wattmeter: warning: skipped 37 malformed line(s): varied.jsonl:")


def test_the_golden_files_cover_every_format_and_option_set():
    formats = {n.split(".")[2] for n in CASES}
    assert formats == {"table", "markdown", "csv", "json", "codecarbon"}
    assert {n.split(".")[1] for n in CASES} == set(OPTIONS)
    assert len(CASES) == 13

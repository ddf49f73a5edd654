"""Carbon settings: precedence, token handling, and one-line errors with exit code 2."""
from __future__ import annotations

import argparse
import os

import pytest

from wattmeter.carbon.config import CarbonConfig, add_carbon_arguments
from wattmeter.cli import main
from wattmeter.errors import UsageError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("WATTMETER_"):
            monkeypatch.delenv(name)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_carbon_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_beat_env_beat_file_beat_defaults():
    file_config = {"zone": "PL", "pue": 1.4, "wue": 1.8, "renewable_share": 0.1}
    env = {"WATTMETER_ZONE": "DE", "WATTMETER_PUE": "1.3"}
    config = CarbonConfig.from_args(parse("--zone", "FR"), env=env, file_config=file_config)
    assert (config.zone, config.pue, config.wue_l_per_kwh, config.renewable_share) == ("FR", 1.3, 1.8, 0.1)
    assert config.service_life_years == 4.0 and config.provider == "table"
    assert CarbonConfig.from_args(parse(), env={}, file_config={"carbon": {"zone": "SE"}, "zone": "NO"}).zone == "SE"


def test_defaults_need_no_network_and_no_zone():
    config = CarbonConfig.from_args(parse(), env={})
    assert config.zone_info().key == "WORLD" and config.effective_pue() == 1.0
    assert config.build_source().read(0.0).source == "table:world-default"


def test_cloud_sets_pue_unless_pue_given_and_zone_overrides_intensity():
    assert CarbonConfig.from_args(parse("--cloud", "azure:westeurope"), env={}).effective_pue() == 1.185
    config = CarbonConfig.from_args(parse("--cloud", "aws:us-east-1", "--zone", "US-VA", "--pue", "1.2"), env={})
    assert (config.zone_info().key, config.effective_pue()) == ("US-VA", 1.2)


def test_token_comes_from_env_or_file_and_never_shows(tmp_path):
    env = {"WATTMETER_ELECTRICITYMAPS_TOKEN": "tok-env-123"}
    config = CarbonConfig.from_args(parse("--carbon-provider", "electricitymaps", "--zone", "FR"), env=env)
    assert config.provider_token == "tok-env-123"
    assert "tok-env-123" not in repr(config) and "tok-env-123" not in str(config.public_dict())
    token_file = tmp_path / "token"
    token_file.write_text("tok-file-456\n")
    config = CarbonConfig.from_args(parse("--carbon-provider", "electricitymaps", "--carbon-token-file",
                                          str(token_file)), env=env)
    assert config.provider_token == "tok-file-456"


@pytest.mark.parametrize("argv,env,fragment", [
    (("--pue", "0.9"), {}, "--pue 0.9 is below 1"),
    ((), {"WATTMETER_PUE": "0.5"}, "WATTMETER_PUE=0.5 is below 1"),
    (("--renewable-share", "1.5"), {}, "outside [0, 1]"),
    (("--renewable-share", "-0.1"), {}, "outside [0, 1]"),
    (("--carbon-provider", "electricitymaps"), {}, "WATTMETER_ELECTRICITYMAPS_TOKEN"),
    (("--zone", "FRR"), {}, "closest: FR (France)"),
    ((), {"WATTMETER_ZONE": "Germny"}, "DE (Germany)"),
    (("--cloud", "aws:us-east-9"), {}, "aws:us-east-1"),
    (("--carbon-provider", "ukgrid", "--zone", "FR"), {}, "Great Britain only"),
    (("--carbon-provider", "watttime"), {}, "unknown carbon provider"),
    ((), {"WATTMETER_PUE": "fast"}, "WATTMETER_PUE=fast is not a number"),
    (("--carbon-token-file", "/nonexistent/token", "--carbon-provider", "electricitymaps"), {}, "token file"),
])
def test_bad_settings_raise_one_line(argv, env, fragment):
    with pytest.raises(UsageError) as exc:
        CarbonConfig.from_args(parse(*argv), env=env)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_estimate_reads_the_config_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "wattmeter.toml").write_text('zone = "SE"\npue = 1.2\n')
    monkeypatch.chdir(tmp_path)
    assert main(["estimate", "--gpu", "L4", "--hours", "1"]) == 0
    out = capsys.readouterr().out
    assert "in SE (Sweden)" in out and "PUE 1.2" in out
    assert main(["estimate", "--gpu", "L4", "--hours", "1", "--zone", "NO"]) == 0
    assert "in NO (Norway)" in capsys.readouterr().out          # the flag wins over the file


@pytest.mark.parametrize("argv,fragment", [
    (["--zone", "Atlantis"], "unknown zone 'Atlantis'"),
    (["--cloud", "gcp:mars-north1"], "unknown cloud region 'gcp:mars-north1'"),
    (["--pue", "0.8"], "--pue 0.8 is below 1"),
    (["--renewable-share", "2"], "outside [0, 1]"),
    (["--carbon-provider", "electricitymaps"], "needs an API token"),
])
def test_cli_bad_carbon_input_exits_2_with_one_line(argv, fragment, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WATTMETER_ELECTRICITYMAPS_TOKEN", raising=False)
    rc = main(["estimate", "--gpu", "H100", "--hours", "1", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err

"""`cqrs load` configuration: the --mix parser, the flags and the bounds."""

from __future__ import annotations

import math

import pytest

from cqrsctl.load.cli import config_from_args
from cqrsctl.load.config import (
    DEFAULT_MIX,
    MAX_DURATION_S,
    MAX_REQUESTS,
    OPERATIONS,
    ConfigError,
    LoadConfig,
    format_mix,
    parse_mix,
)
from cqrsctl.load.runner import make_specs
from cqrsctl.main import build_parser


def test_mix_parses_weights_and_leaves_out_zero_weights() -> None:
    assert parse_mix("create=1, add=3,get=4.5,cancel=0") == {"create": 1.0, "add": 3.0, "get": 4.5}


def test_default_mix_covers_every_operation() -> None:
    assert set(DEFAULT_MIX) == set(OPERATIONS)
    assert parse_mix(format_mix(DEFAULT_MIX)) == DEFAULT_MIX


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("create=1,explode=2", "unknown operation 'explode'"),
        ("create=1,create=2", "appears twice"),
        ("create", "op=weight"),
        ("create=abc", "must be a number"),
        ("create=-1", ">= 0"),
        ("create=nan", ">= 0"),
        ("create=inf", ">= 0"),
        ("create=0,get=0", "at least one operation"),
        ("", "at least one operation"),
    ],
)
def test_bad_mixes_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_mix(text)


def test_a_run_needs_a_bound_and_both_bounds_are_capped() -> None:
    with pytest.raises(ConfigError, match="needs a bound"):
        LoadConfig().validate()
    with pytest.raises(ConfigError, match="duration"):
        LoadConfig(duration=MAX_DURATION_S + 1).validate()
    with pytest.raises(ConfigError, match="max-requests"):
        LoadConfig(max_requests=MAX_REQUESTS + 1).validate()
    only_count = LoadConfig(max_requests=10)
    only_count.validate()
    assert only_count.effective_duration == MAX_DURATION_S
    only_time = LoadConfig(duration=1)
    assert only_time.effective_max_requests == MAX_REQUESTS


@pytest.mark.parametrize(
    "config",
    [
        LoadConfig(duration=1, mode="open"),  # no rate
        LoadConfig(duration=1, mode="open", rate=0),
        LoadConfig(duration=1, mode="open", rate=math.inf),
        LoadConfig(duration=1, concurrency=0),
        LoadConfig(duration=1, workers=0),
        LoadConfig(duration=1, ttq_sample=1.5),
        LoadConfig(duration=1, deadline=0),
        LoadConfig(duration=1, customers=0),
        LoadConfig(duration=1, mix={"create": 1, "bogus": 1}),
        LoadConfig(duration=1, command_addr=""),
        LoadConfig(duration=1, read_consistency="strong"),  # type: ignore[arg-type]
    ],
)
def test_bad_settings_are_refused(config: LoadConfig) -> None:
    with pytest.raises(ConfigError):
        config.validate()


def test_workers_never_outnumber_callers_or_requests() -> None:
    assert LoadConfig(duration=1, concurrency=1, workers=4).effective_workers == 1
    assert LoadConfig(max_requests=3, concurrency=10, workers=8).effective_workers == 3
    assert LoadConfig(duration=1, mode="open", rate=5, workers=4).effective_workers == 4


def test_cli_flags_become_a_process_based_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CQRS_COMMAND_ADDR", "cmd.example:1")
    args = build_parser().parse_args(
        ["load", "--mode", "open", "--rate", "100", "--duration", "5", "--mix", "create=1,get=2", "--quiet"]
    )
    config = config_from_args(args)
    assert config.processes and config.quiet and config.charts
    assert config.mode == "open" and config.rate == 100 and config.duration == 5
    assert config.mix == {"create": 1.0, "get": 2.0}
    assert str(config.out_dir) == "load-report"
    assert config.query_addr == "127.0.0.1:50052"
    assert config.read_consistency == "eventual" and config.describe()["read_consistency"] == "eventual"


def test_read_consistency_flag_reaches_every_worker() -> None:
    args = build_parser().parse_args(["load", "--duration", "1", "--workers", "2", "--read-consistency", "token"])
    config = config_from_args(args)
    assert config.read_consistency == "token" and config.describe()["read_consistency"] == "token"
    assert [spec.read_consistency for spec in make_specs(config, ("c1",))] == ["token", "token"]


@pytest.mark.parametrize(
    "argv",
    [
        ["load", "--duration", "1", "--mode", "open"],  # open without rate
        ["load", "--duration", "1", "--rate", "5"],  # rate in closed loop
        ["load", "--concurrency", "4"],  # no bound
        ["load", "--duration", "1", "--mix", "create=x"],
    ],
)
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from cqrsctl.main import main

    assert main(argv) == 2
    assert "cqrs load:" in capsys.readouterr().err


def test_flags_argparse_rejects_exit_2() -> None:
    from cqrsctl.main import main

    for argv in (["load", "--duration", "abc"], ["load", "--duration", "1", "--read-consistency", "strong"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2

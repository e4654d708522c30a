"""One way to configure: every flag has a DEQ_* twin; flags win over the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from deq_server.serving.config import ServerConfig, env_name, parse_config


def test_environment_sets_every_kind_of_field_and_flags_win():
    env = {
        "DEQ_ADDRESS": "127.0.0.1:6000",
        "DEQ_MODEL_DIR": "/srv/models",
        "DEQ_MAX_BATCH": "7",
        "DEQ_MIN_TOL": "1e-6",
        "DEQ_LOG_FORMAT": "json",
        "DEQ_ADMIN_TOKENS": "a,b",
    }
    config = parse_config([], env=env)
    assert config.address == "127.0.0.1:6000"
    assert config.model_dir == Path("/srv/models")
    assert config.max_batch == 7
    assert config.min_tol == 1e-6
    assert config.log_format == "json"
    assert config.admin_tokens == "a,b"
    assert parse_config(["--max-batch", "9"], env=env).max_batch == 9


def test_defaults_serve_the_demo_on_loopback_from_a_per_user_model_dir():
    config = parse_config([], env={"XDG_DATA_HOME": "/data/home"})
    assert config == ServerConfig(model_dir=Path("/data/home/deq-serve/models"))
    assert config.address == "127.0.0.1:50051"
    assert config.metrics_address == "127.0.0.1:9090"
    # XDG: a relative or empty XDG_DATA_HOME is ignored, in favour of ~/.local/share
    fallback = Path.home() / ".local" / "share" / "deq-serve" / "models"
    for env in ({}, {"XDG_DATA_HOME": ""}, {"XDG_DATA_HOME": "relative/dir"}):
        assert parse_config([], env=env).model_dir == fallback
    # an empty value means no model directory at all
    assert parse_config(["--model-dir", ""], env={}).model_dir is None


def test_every_field_has_a_flag_and_an_environment_variable(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"], env={})
    text = capsys.readouterr().out
    for f in fields(ServerConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert env_name(f.name) in text


@pytest.mark.parametrize(
    "argv",
    [
        ["--tls-cert", "c.pem"],
        ["--dtype", "int8"],
        ["--max-batch", "x"],
        ["--keep-versions", "0"],
        ["--max-train-steps", "0"],
        ["--max-train-sessions", "-1"],
    ],
)
def test_bad_settings_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_config(argv, env={})


def test_memory_and_training_caps_have_environment_twins():
    env = {"DEQ_KEEP_VERSIONS": "3", "DEQ_MAX_TRAIN_STEPS": "50", "DEQ_MAX_TRAIN_SESSIONS": "1"}
    config = parse_config([], env=env)
    assert (config.keep_versions, config.max_train_steps, config.max_train_sessions) == (3, 50, 1)
    defaults = parse_config([], env={})
    assert (defaults.keep_versions, defaults.max_train_steps, defaults.max_train_sessions) == (
        2,
        10_000,
        4,
    )


# Item 6 of issue 13: the configuration cannot lie. A DEQ_* value goes through the flag's own
# parsing, choices and range checks; any refusal is one line on stderr and exit status 2.
INT_FLOORS = {
    "max_batch": 1,
    "max_queue": 1,
    "workers": 1,
    "max_iter_cap": 1,
    "max_batch_slots": 1,
    "max_message_bytes": 1,
    "keep_versions": 1,
    "max_model_bytes": 1,
    "max_train_steps": 1,
    "max_train_sessions": 1,
    "max_watch_streams": 1,
    "max_streams_per_connection": 1,
    "max_concurrent_rpcs": 0,
    "max_infer_streams": 0,
    "torch_threads": 0,
}
SECONDS = [
    "train_idle_seconds",
    "stream_idle_seconds",
    "connection_idle_seconds",
    "train_max_seconds",
]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def refusal(capsys, argv: list[str], env: dict[str, str]) -> str:
    """The one line parse_config writes before exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv, env=env)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("deq-server: error: ")
    return lines[0]


def assert_refused_both_ways(capsys, name: str, text: str) -> None:
    assert flag(name) in refusal(capsys, [flag(name), text], {})
    assert env_name(name) in refusal(capsys, [], {env_name(name): text})


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(INT_FLOORS)), below=st.integers(min_value=1, max_value=2**70))
def test_integers_below_their_floor_are_refused_as_flag_and_variable(capsys, name, below):
    assert_refused_both_ways(capsys, name, str(INT_FLOORS[name] - below))


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(sorted(INT_FLOORS)),
    text=st.text(min_size=1, max_size=8).filter(lambda t: not t.strip().lstrip("+-").isdigit()),
)
def test_text_that_is_no_integer_is_refused_as_flag_and_variable(capsys, name, text):
    assume(not text.startswith("-"))  # argparse reads "-x" after a flag as another option
    assume("\x00" not in text)
    assert_refused_both_ways(capsys, name, text)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(INT_FLOORS)), value=st.integers(min_value=0, max_value=10**6))
def test_a_flag_and_its_variable_parse_the_same_value_the_same_way(name, value):
    value += INT_FLOORS[name]
    from_flag = parse_config([flag(name), str(value)], env={})
    from_env = parse_config([], env={env_name(name): str(value)})
    assert from_flag == from_env
    assert getattr(from_env, name) == value


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["dtype", "scheduler", "log_format", "device"]),
    text=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:_", min_size=1, max_size=10),
)
def test_names_outside_the_choices_are_refused_as_flag_and_variable(capsys, name, text):
    assume(text not in {"float32", "float64", "auto", "continuous", "request", "text", "json"})
    assume(text not in {"auto", "cpu", "cuda"} and not text.removeprefix("cuda:").isdigit())
    assert_refused_both_ways(capsys, name, text)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from([*SECONDS, "grace_seconds", "min_tol"]),
    value=st.one_of(
        st.sampled_from([float("nan"), float("inf"), -float("inf")]),
        st.floats(max_value=-1e-300, allow_nan=False, allow_infinity=False),
    ),
)
def test_seconds_and_tolerances_must_be_finite_and_positive(capsys, name, value):
    assert_refused_both_ways(capsys, name, repr(value))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DEQ_SCHEDULER", "bogus"),
        ("DEQ_DTYPE", "int8"),
        ("DEQ_MAX_BATCH", "abc"),
        ("DEQ_ADDRESS", "no-port"),
        ("DEQ_METRICS_ADDRESS", "host:99999"),
        ("DEQ_LOG_FORMAT", "xml"),
    ],
)
def test_the_environment_cases_of_the_issue_are_refused(capsys, variable, value):
    assert variable in refusal(capsys, [], {variable: value})


def test_zero_seconds_of_grace_and_an_empty_metrics_address_are_valid():
    config = parse_config([], env={"DEQ_GRACE_SECONDS": "0", "DEQ_METRICS_ADDRESS": ""})
    assert config.grace_seconds == 0.0
    assert config.metrics_address == ""
    assert parse_config([], env={"DEQ_TLS_CERT": "", "DEQ_MODEL_DIR": ""}) == ServerConfig()


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"], env={})
    text = " ".join(capsys.readouterr().out.split())
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        value = getattr(defaults, f.name)
        shown = "none" if value is None else ("''" if value == "" else str(value))
        if f.name == "model_dir":
            shown = "$XDG_DATA_HOME/deq-serve/models, else ~/.local/share/deq-serve/models"
        if isinstance(value, bool):
            shown = "on" if value else "off"
        assert f"(default: {shown}; env {env_name(f.name)})" in text, f.name


def test_the_server_process_refuses_a_bad_variable_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "deq_server"],
        env={**os.environ, "DEQ_MAX_BATCH": "abc", "DEQ_ADDRESS": "127.0.0.1:0"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "deq-server: error: DEQ_MAX_BATCH: expected an integer, got 'abc' (see deq-server --help)"
    ]


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, "auto"),
        (["--compile-step"], {}, "on"),  # a bare flag means on, as it always did
        (["--compile-step", "off"], {}, "off"),
        (["--compile-step=auto"], {"DEQ_COMPILE_STEP": "on"}, "auto"),  # the flag wins
        ([], {"DEQ_COMPILE_STEP": "1"}, "on"),  # boolean spellings still work
        ([], {"DEQ_COMPILE_STEP": "false"}, "off"),
        ([], {"DEQ_COMPILE_STEP": " Auto "}, "auto"),
        ([], {"DEQ_COMPILE_STEP": ""}, "auto"),  # empty: as if unset
        (["--no-compile-step"], {"DEQ_COMPILE_STEP": "on"}, "off"),  # as when it was a bool
    ],
)
def test_compile_step_is_auto_on_or_off(argv, env, expected):
    assert parse_config(argv, env=env).compile_step == expected


@pytest.mark.parametrize("text", ["maybe", "2", "yes please"])
def test_compile_step_refuses_other_words_as_flag_and_variable(capsys, text):
    assert_refused_both_ways(capsys, "compile_step", text)

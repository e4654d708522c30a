"""One way to configure: every flag has a DEQ_* twin; flags win over the environment."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

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


def test_defaults_serve_the_demo_on_loopback():
    config = parse_config([], env={})
    assert config == ServerConfig()
    assert config.address == "127.0.0.1:50051"
    assert config.metrics_address == "127.0.0.1:9090"
    assert config.model_dir is None


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

"""The reference tables of docs/ stay true: every flag and DEQ_* variable of `ServerConfig` has a
row in docs/configuration.md, every series a server exports has one in the "Metrics" table of
docs/api.md, and every file docs/deployment.md names exists."""

from __future__ import annotations

import re
from dataclasses import fields

from promql_sources import REPO

from deq_server.serving.config import ServerConfig, env_name
from deq_server.serving.metrics import GrpcMetricsInterceptor, Metrics

DOCS = REPO / "docs"


def section(page: str, title: str) -> str:
    """The text of docs/`page` under `## title` up to the next `## ` heading."""
    text = (DOCS / page).read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_every_setting_has_a_row_in_the_configuration_table() -> None:
    rows = table_rows(section("configuration.md", "Flags and variables"))
    for field in fields(ServerConfig):
        flag, variable = "--" + field.name.replace("_", "-"), env_name(field.name)
        assert any(f"`{flag}`" in row and f"`{variable}`" in row for row in rows), flag


def test_every_exported_series_has_a_row_in_the_metrics_table() -> None:
    metrics = Metrics()
    GrpcMetricsInterceptor(metrics.registry)
    rows = "\n".join(table_rows(section("api.md", "Metrics")))
    families = {family.name for family in metrics.registry.collect()}
    assert "deq_device_memory_bytes" in families
    assert sorted(name for name in families if name not in rows) == []


def test_the_deployment_sections_name_files_that_exist() -> None:
    text = (DOCS / "deployment.md").read_text()
    named = set(re.findall(r"`((?:deploy|tests)/[\w./-]+|docker-compose[\w.]*\.yml)`", text))
    assert len(named) > 8
    assert sorted(path for path in named if not (REPO / path).exists()) == []

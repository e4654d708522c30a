"""A real Prometheus scrapes a real deq-server under traffic of every kind; then every PromQL
expression of the Grafana dashboard and of the alert rules must return data.

The scrape job is the shipped one (deploy/prometheus/prometheus.yml, same job name, so the alerts'
`up{job="deq"}` matches) with its DNS discovery swapped for the test server's loopback address,
and the shipped alerts.yml is loaded as is. A panel whose expression returns nothing, or only NaN,
fails the test and is named in the message.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import promql_sources as sources
import pytest
import yaml
from deploy_traffic import MODEL, every_kind
from prometheus_process import BINARY, PrometheusAPI, poll, running_prometheus
from serving_harness import running_server

from deq_client import DEQClient

pytestmark = pytest.mark.skipif(
    BINARY is None, reason="prometheus is not installed (scripts/test.sh installs Debian's)"
)

# Grafana's interval variables: windows that hold several 1 s scrapes of the ongoing traffic.
INTERVALS = {"__rate_interval": "30s", "__interval": "5s", "__range": "1m"}
TRAFFIC_ROUNDS, DATA_TIMEOUT = 60, 120.0


def scrape_config(metrics_port: int) -> dict[str, Any]:
    """The shipped configuration, scraping 127.0.0.1:`metrics_port` every second."""
    shipped = yaml.safe_load(sources.PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in shipped["scrape_configs"] if j["job_name"] == "deq"]
    job = {k: v for k, v in job.items() if not k.endswith("_sd_configs")}
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    rule_files = [str(sources.PROMETHEUS_CONFIG.parent / f) for f in shipped["rule_files"]]
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": rule_files,
        "scrape_configs": [job],
    }


def _target_up(api: PrometheusAPI) -> bool:
    targets = api.get("/api/v1/targets")["activeTargets"]
    return any(t["labels"]["job"] == "deq" and t["health"] == "up" for t in targets)


def _rules_healthy(api: PrometheusAPI) -> list[dict[str, Any]]:
    rules = [r for g in api.get("/api/v1/rules")["groups"] for r in g["rules"]]
    return rules if rules and all(r["health"] == "ok" for r in rules) else []


def test_every_dashboard_and_alert_expression_returns_data(tmp_path: Path) -> None:
    dashboard, rules = sources.load_dashboard(), sources.load_alert_rules()
    models = tmp_path / "models"
    models.mkdir()
    with (
        running_server(model_dir=models) as server,
        running_prometheus(scrape_config(server.metrics_port or 0), tmp_path) as api,
        DEQClient(f"127.0.0.1:{server.port}", timeout=30) as client,
    ):
        poll(lambda: _target_up(api), timeout=30, interval=0.2, what="the deq target to be up")
        names = api.get("/api/v1/label/model/values", **{"match[]": "deq_model_info"})
        assert MODEL in names
        variables = {"model": MODEL, **INTERVALS}
        queries = sources.dashboard_queries(dashboard, variables) + sources.alert_queries(rules)
        assert len(queries) > 20

        # Rounds of traffic until every expression has data: rates need increases seen by two
        # scrapes, so the traffic has to span a few. Bounded in rounds and in time.
        deadline = time.monotonic() + DATA_TIMEOUT
        for _ in range(TRAFFIC_ROUNDS):
            every_kind(client)
            missing = [q for q in queries if not api.has_data(q.expr)]
            if not missing or time.monotonic() > deadline:
                break
        assert not missing, "no data for:\n" + "\n".join(f"{q.where}: {q.expr}" for q in missing)

        loaded = poll(
            lambda: _rules_healthy(api), timeout=30, interval=0.5, what="every rule to evaluate"
        )
        assert {r["name"] for r in loaded} == {r["alert"] for r in rules}

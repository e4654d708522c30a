"""The monitoring files, checked without a running stack.

promtool accepts the Prometheus configuration and the rules, and the rules' unit tests
(alerts_test.yml) pass: each alert fires on series that breach it and stays quiet on healthy
ones. The dashboard queries the provisioned datasource, filters every per-model series by the
`$model` variable, and uses every series the server exports; Grafana's provisioning points at
the paths docker-compose.yml mounts. (tests/test_deploy_prometheus.py runs every expression
against a real Prometheus.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from promql_sources import DASHBOARD, REPO, load_dashboard, panels

from deq_server.serving.metrics import Metrics

PROMTOOL = shutil.which("promtool")
GRAFANA = REPO / "deploy" / "grafana"
PROMETHEUS = REPO / "deploy" / "prometheus"
# Series the server exports whose `model` label the dashboard's $model variable filters.
PER_MODEL = re.compile(r"\b(deq_(?:inference|solver|batch|train_(?:loss|steps)|model_info)\w*)")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian's prometheus)")
@pytest.mark.parametrize(
    "command",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
    ids=" ".join,
)
def test_promtool_accepts_the_config_and_the_rules(command: list[str]) -> None:
    result = subprocess.run(
        [str(PROMTOOL), *command], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def provisioned(kind: str, key: str) -> dict[str, Any]:
    """The one entry of the one provisioning file of `kind` (datasources, dashboards)."""
    (path,) = (GRAFANA / "provisioning" / kind).glob("*.yml")
    (entry,) = yaml.safe_load(path.read_text())[key]
    return dict(entry)


def test_every_panel_queries_the_provisioned_datasource() -> None:
    uid = provisioned("datasources", "datasources")["uid"]
    dashboard = load_dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in [panel, *panel["targets"]]:
            assert target["datasource"]["uid"] == uid, panel["title"]


def test_per_model_series_are_filtered_by_the_model_variable() -> None:
    dashboard = load_dashboard()
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "model"
    assert variable["query"]["query"] == "label_values(deq_model_info, model)"
    for panel in panels(dashboard):
        for target in panel["targets"]:
            for metric in PER_MODEL.findall(target["expr"]):
                selector = target["expr"].split(metric, 1)[1]
                assert selector.startswith('{model=~"$model"'), f"{panel['title']}: {metric}"


def test_the_dashboard_uses_every_series_the_server_exports() -> None:
    text = DASHBOARD.read_text()
    exported = {f.name for f in Metrics().registry.collect() if f.name.startswith("deq_")}
    assert exported
    assert sorted(name for name in exported if name not in text) == []


def test_grafana_and_prometheus_find_their_files_where_compose_mounts_them() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    mounts = {
        volume.split(":")[1]: REPO / volume.split(":")[0]
        for service in ("grafana", "prometheus")
        for volume in compose[service]["volumes"]
        if volume.startswith("./")
    }
    dashboards = Path(provisioned("dashboards", "providers")["options"]["path"])
    assert mounts[str(dashboards)] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    assert mounts["/etc/prometheus"] == PROMETHEUS
    home = compose["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards}/{DASHBOARD.name}"
    assert provisioned("datasources", "datasources")["url"] == "http://prometheus:9090"

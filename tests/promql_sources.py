"""Every PromQL expression the deployment ships, ready to send to a real Prometheus.

Sources: the Grafana dashboard (every panel target and the template variable's query) and the
alert rules. Grafana variables are replaced the way Grafana would (`$model` by a model the
server serves, `$__rate_interval` by a window covering a few scrapes). An alert expression is
`signal <comparison> threshold`, which returns nothing while the alert is quiet; both the signal
alone and the comparison with `bool` (0 or 1 per series) must return data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "deq.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"

_LABEL_VALUES = re.compile(r"^label_values\((?P<metric>.+),\s*(?P<label>\w+)\)$")
_OPENERS, _CLOSERS = "([{", ")]}"


@dataclass(frozen=True)
class Query:
    """One expression to evaluate, and where it comes from (for the failure message)."""

    where: str
    expr: str


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def load_alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included; rows themselves are skipped."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replaces `$name`, `${name}` and `[[name]]` (longest names first, so `$__range_s` wins)."""
    for name in sorted(variables, key=len, reverse=True):
        for form in (f"${{{name}}}", f"[[{name}]]", f"${name}"):
            expr = expr.replace(form, variables[name])
    return expr


def dashboard_queries(dashboard: Mapping[str, Any], variables: Mapping[str, str]) -> list[Query]:
    """Every target of every panel, plus each query variable (label_values(m, l) -> m)."""
    queries = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = _LABEL_VALUES.match(variable["query"]["query"].strip())
            assert found, f"variable {variable['name']}: only label_values(metric, label) is known"
            queries.append(Query(f"variable ${variable['name']}", found["metric"]))
    for panel in panels(dashboard):
        for target in panel["targets"]:
            where = f"panel {panel['title']!r} target {target['refId']}"
            queries.append(Query(where, substitute(target["expr"], variables)))
    return queries


def split_comparison(expr: str) -> tuple[str, str, str] | None:
    """(left, operator, right) at the last comparison outside brackets and strings, or None."""
    depth, quote, found, i = 0, "", None, 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
        elif depth == 0 and expr[i : i + 2] in ("==", "!=", ">=", "<="):
            found = (i, 2)
            i += 1
        elif depth == 0 and char in "<>":
            found = (i, 1)
        i += 1
    if found is None:
        return None
    at, size = found
    return expr[:at].strip(), expr[at : at + size], expr[at + size :].strip()


def alert_queries(rules: list[dict[str, Any]]) -> list[Query]:
    """Each rule's signal and its comparison as `bool`; a recording rule's expression as is."""
    queries = []
    for rule in rules:
        name = rule.get("alert") or rule["record"]
        expr = " ".join(rule["expr"].split())
        parts = split_comparison(expr) if "alert" in rule else None
        if parts is None:
            queries.append(Query(f"rule {name}", expr))
            continue
        left, operator, right = parts
        queries.append(Query(f"alert {name} signal", left))
        queries.append(Query(f"alert {name} as bool", f"{left} {operator} bool {right}"))
    return queries

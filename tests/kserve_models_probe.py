"""Loads KServe resources into the KServe Python SDK's models and prints what it found, as JSON.

Run by test_kubernetes.py with the Python of .tools/kserve-venv (scripts/test.sh makes it): the
SDK ships its own copy of the `inference` protobuf package, which cannot share a process with the
server's stubs. Reads a JSON list of objects on stdin. Each object is built field by field into
the SDK's class for its kind (the Kubernetes parts into the kubernetes client's classes, which
the SDK's models use), so a required field that is missing, an enum value the class refuses, a
value of the wrong type, and a key the class does not know (which the SDK's own deserializer
would drop without a word) are all reported. Then the built model is serialised again (by the SDK)
and every value of the input must come back.
"""

from __future__ import annotations

import json
import re
import sys
from importlib.metadata import version
from typing import Any

import kserve.models
import kubernetes.client.models
from kserve import ApiClient

CLASSES = {
    "serving.kserve.io/v1alpha1/ServingRuntime": "V1alpha1ServingRuntime",
    "serving.kserve.io/v1alpha1/ClusterServingRuntime": "V1alpha1ClusterServingRuntime",
    "serving.kserve.io/v1beta1/InferenceService": "V1beta1InferenceService",
}
PRIMITIVES = {"str": str, "int": int, "float": (int, float), "bool": bool}


def model_class(name: str) -> Any:
    found = getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name, None)
    if found is None:
        raise LookupError(f"no model class {name}")
    return found


def build(data: Any, klass: str, path: str, problems: list[str]) -> Any:
    if data is None:
        return None
    # The generators of the two SDKs spell containers differently: list[X] / List[X],
    # dict(str, X) / Dict[str, X].
    if sequence := re.fullmatch(r"[lL]ist\[(.+)\]", klass):
        if not isinstance(data, list):
            problems.append(f"{path}: expected a list, got {data!r}")
            return None
        inner = sequence.group(1)
        return [build(item, inner, f"{path}[{i}]", problems) for i, item in enumerate(data)]
    if mapping := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", klass):
        if not isinstance(data, dict):
            problems.append(f"{path}: expected a map, got {data!r}")
            return None
        inner = mapping.group(1) or mapping.group(2)
        return {k: build(v, inner, f"{path}.{k}", problems) for k, v in data.items()}
    if klass in PRIMITIVES:
        wanted = PRIMITIVES[klass]
        wrong_bool = isinstance(data, bool) and klass != "bool"
        if wrong_bool or not isinstance(data, wanted):
            problems.append(f"{path}: expected {klass}, got {data!r}")
        return data
    if klass == "object":  # IntOrString and free-form fields
        return data
    cls = model_class(klass)
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a {klass} object, got {data!r}")
        return None
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    kwargs = {}
    for key, value in data.items():
        if key not in by_key:
            problems.append(f"{path}.{key}: not a field of {klass}")
            continue
        attr = by_key[key]
        kwargs[attr] = build(value, cls.openapi_types[attr], f"{path}.{key}", problems)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        problems.append(f"{path}: {klass} refused it: {error}")
        return None


def differences(given: Any, again: Any, path: str) -> list[str]:
    """Where the serialised model lost or changed a value of the input (defaults the model
    adds, such as an empty container name, are not differences)."""
    if isinstance(given, dict) and isinstance(again, dict):
        found = []
        for key, value in given.items():
            if key not in again:
                found.append(f"{path}.{key}: dropped")
            else:
                found += differences(value, again[key], f"{path}.{key}")
        return found
    if isinstance(given, list) and isinstance(again, list) and len(given) == len(again):
        return [
            d
            for i, (a, b) in enumerate(zip(given, again, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    return [] if given == again else [f"{path}: {given!r} came back as {again!r}"]


def main() -> None:
    report = []
    for obj in json.load(sys.stdin):
        key = f"{obj.get('apiVersion')}/{obj.get('kind')}"
        name = obj.get("metadata", {}).get("name")
        klass = CLASSES.get(key)
        if klass is None:
            report.append({"object": key, "name": name, "problems": [f"no SDK model for {key}"]})
            continue
        problems: list[str] = []
        model = build(obj, klass, obj["kind"], problems)
        again = ApiClient().sanitize_for_serialization(model) if model is not None else None
        report.append(
            {
                "object": key,
                "name": name,
                "class": type(model).__module__ + "." + type(model).__name__,
                "problems": problems,
                "round_trip": differences(obj, again, obj["kind"]),
            }
        )
    json.dump({"kserve": version("kserve"), "objects": report}, sys.stdout)


if __name__ == "__main__":
    main()

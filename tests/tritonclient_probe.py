"""Drives a deq-server with tritonclient, unchanged, and prints what it saw as JSON.

Run as a separate process by test_oip.py: tritonclient registers its own copy of the `inference`
protobuf package, which cannot share a process with the server's generated stubs.
Usage: python tritonclient_probe.py PORT
"""

from __future__ import annotations

import json
import sys

import ml_dtypes
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def pixels(n: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 17, size=(n, 64)).astype(np.float32)


def error_of(call) -> str:  # type: ignore[no-untyped-def]
    try:
        call()
    except InferenceServerException as exc:
        return str(exc)
    return ""


def main() -> None:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{sys.argv[1]}")
    x = pixels(4)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(
        "digits", [inp], parameters={"tol": 1e-6, "method": "picard", "max_iter": 200}
    )
    # The same pixels (integers, exact in 16 bits) as BF16 (ml_dtypes, as tritonclient wants) and FP16.
    half_inputs = []
    for datatype, dtype in (("BF16", ml_dtypes.bfloat16), ("FP16", np.float16)):
        half = triton.InferInput("input", list(x.shape), datatype)
        half.set_data_from_numpy(x.astype(dtype))
        half_inputs.append(half)
    halves = [
        client.infer(
            "digits", [half], parameters={"tol": 1e-6, "method": "picard", "max_iter": 200}
        )
        for half in half_inputs
    ]
    # What a client without double parameters (KServe's) sends: the numbers as strings.
    as_strings = client.infer(
        "digits", [inp], parameters={"tol": "1e-6", "method": "picard", "max_iter": "200"}
    )
    bad_shape = triton.InferInput("input", [1, 63], "FP32")
    bad_shape.set_data_from_numpy(np.zeros((1, 63), np.float32))
    good = triton.InferInput("input", [1, 64], "FP32")
    good.set_data_from_numpy(pixels(1))
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("digits"),
        "unknown_model_ready": client.is_model_ready("nope"),
        "metadata": client.get_model_metadata("digits", as_json=True),
        "server_name": client.get_server_metadata(as_json=True)["name"],
        "input": x.tolist(),
        "output": result.as_numpy("output").tolist(),
        "output_bf16": halves[0].as_numpy("output").tolist(),
        "output_fp16": halves[1].as_numpy("output").tolist(),
        "iterations": result.as_numpy("iterations").tolist(),
        "status": result.as_numpy("status").tolist(),
        "residual": result.as_numpy("residual").tolist(),
        "output_string_parameters": as_strings.as_numpy("output").tolist(),
        "iterations_string_parameters": as_strings.as_numpy("iterations").tolist(),
        "error_nan_tol": error_of(
            lambda: client.infer("digits", [good], parameters={"tol": "nan"})
        ),
        "error_bad_shape": error_of(lambda: client.infer("digits", [bad_shape])),
        "error_bad_parameter": error_of(
            lambda: client.infer("digits", [good], parameters={"solver": "fast"})
        ),
        "error_unknown_model": error_of(lambda: client.infer("nope", [good])),
    }
    client.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()

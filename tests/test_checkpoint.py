"""Checkpoints (`deq_server.core._checkpoint`): round trips, provenance, refusal of untrusted or
damaged files, and atomic saving."""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import pickle
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deq_server.core import CheckpointError, DEQModel, load_checkpoint, save_checkpoint
from deq_server.core._checkpoint import checkpoint_digest

MLP = {"cell": "mlp", "in_features": 5, "hidden": 8, "out_features": 3}
CONV = {
    "cell": "conv",
    "in_channels": 2,
    "height": 5,
    "width": 5,
    "channels": 8,
    "out_features": 3,
}
TIED = {"cell": "tied_mlp", "layers": [5, 6, 7, 3], "activations": ["tanh", "relu", "identity"]}
CONFIGS = {
    "mlp": MLP,
    "conv": CONV,
    "tied_mlp": TIED,
    "mlp_spectral": {**MLP, "norm": "spectral"},
    "mlp_weight": {**MLP, "norm": "weight"},
}
INPUT_SHAPES = {"mlp": (3, 5), "conv": (2, 2, 5, 5), "tied_mlp": (3, 5)}
REQUIRED_KEYS = ("deq_format_version", "config", "architecture", "created_at", "sha256")
UNREADABLE = r"truncated|corrupt|not a readable"


def make_model(config: dict[str, Any], dtype: torch.dtype = torch.float32) -> DEQModel:
    """A model in eval mode whose weights a fresh `from_config` cannot reproduce by chance."""
    torch.manual_seed(0)
    model = DEQModel.from_config(config).to(dtype=dtype).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def make_input(config: dict[str, Any], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(INPUT_SHAPES[config["cell"]], generator=gen, dtype=dtype)


def outputs(model: DEQModel, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode outputs; a short solve (same cap for every model compared) keeps tests quick."""
    with torch.no_grad():
        return model.eval()(x, max_iter=12)[0]


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def header_span(data: bytes) -> tuple[int, int]:
    """[start, end) of the JSON header inside a safetensors file."""
    return 8, 8 + int.from_bytes(data[:8], "little")


@pytest.fixture
def saved(tmp_path: Path) -> tuple[DEQModel, Path]:
    model = make_model(MLP)
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path)
    return model, path


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_gives_bitwise_equal_outputs_config_and_dtype(
    tmp_path: Path, name: str, dtype: torch.dtype
) -> None:
    """A loaded model reproduces the saved one exactly: outputs, weights, config and dtype."""
    config = CONFIGS[name]
    model = make_model(config, dtype)
    x = make_input(config, dtype)
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(model, path)

    loaded = load_checkpoint(path)

    assert loaded.config == model.config
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    want, got = outputs(model, x), outputs(loaded, x)
    assert got.dtype == dtype
    assert torch.equal(got, want)
    torch.manual_seed(123)
    fresh = DEQModel.from_config(config).to(dtype=dtype)
    assert not torch.equal(outputs(fresh, x), want)  # outputs depend on the weights
    ref = model.state_dict()
    assert loaded.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_normed_checkpoints_store_the_parametrization_originals(tmp_path: Path) -> None:
    """Spectral and weight norm survive as their raw parameters, not as a baked weight."""
    for norm, suffixes in {"spectral": {"original"}, "weight": {"original0", "original1"}}.items():
        path = tmp_path / f"{norm}.safetensors"
        save_checkpoint(make_model({**MLP, "norm": norm}), path)
        tensors, _ = read_file(path)
        stored = {k.rsplit(".", 1)[1] for k in tensors if ".parametrizations.weight." in k}
        assert stored == suffixes, norm
        assert load_checkpoint(path).config["norm"] == norm


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loading_does_not_import_the_compiler(tmp_path: Path, name: str) -> None:
    """The shape check on the meta device runs no random init and no SVD there: either would
    import torch._dynamo, seconds of every server start on a CPU. A fresh interpreter, so an
    earlier test's import cannot hide it."""
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(make_model(CONFIGS[name]), path)
    probe = (
        "import sys; from deq_server.core import load_checkpoint; "
        f"load_checkpoint({str(path)!r}); print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


# --- metadata ---------------------------------------------------------------------------------


def test_provenance_holds_format_architecture_solver_time_parent_and_user_keys(
    tmp_path: Path,
) -> None:
    model = make_model(CONV)
    path = tmp_path / "conv.safetensors"
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    save_checkpoint(model, path, {"dataset": "mnist", "note": ""}, parent="runs/base.safetensors")
    after = dt.datetime.now(dt.UTC)

    prov = load_checkpoint(path).provenance

    assert prov["deq_format_version"] == "1"
    assert prov["architecture"] == "conv"
    assert json.loads(prov["solver"]) == model.config["solver"]
    assert json.loads(prov["config"]) == model.config
    created = dt.datetime.fromisoformat(prov["created_at"])
    assert created.utcoffset() == dt.timedelta(0)
    assert before <= created <= after
    assert prov["parent"] == "runs/base.safetensors"
    assert prov["user.dataset"] == "mnist"
    assert prov["user.note"] == ""
    assert "dataset" not in prov
    assert prov["path"] == str(path)


def test_parent_defaults_to_empty_string(saved: tuple[DEQModel, Path]) -> None:
    _, path = saved
    assert load_checkpoint(path).provenance["parent"] == ""


def test_user_metadata_cannot_overwrite_reserved_keys(tmp_path: Path) -> None:
    """User keys live under "user.", so a user key named like a reserved one changes nothing."""
    path = tmp_path / "m.safetensors"
    save_checkpoint(make_model(MLP), path, {"sha256": "0" * 64, "deq_format_version": "99"})
    prov = load_checkpoint(path).provenance  # would fail the digest/version checks if clobbered
    assert prov["user.sha256"] == "0" * 64
    assert prov["user.deq_format_version"] == "99"
    assert prov["deq_format_version"] == "1"


@pytest.mark.parametrize("value", [1, 1.5, None, b"bytes", ["a"], {"a": "b"}])
def test_non_str_user_metadata_raises_type_error_and_writes_nothing(
    saved: tuple[DEQModel, Path], value: object
) -> None:
    _, path = saved
    before = path.read_bytes()
    with pytest.raises(TypeError, match="bad"):
        save_checkpoint(make_model(TIED), path, {"ok": "x", "bad": value})  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]


# --- .pt files --------------------------------------------------------------------------------


class _TouchOnUnpickle:
    """Unpickling this creates `marker`: stands in for arbitrary code in a hostile pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (self.marker,))


# torch warns that pickle.dump's default protocol (4) is not its own; the refusal is what counts.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_payload_in_pt_is_refused_without_running(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    model = make_model(MLP)
    payload = {
        "config": model.config,
        "state_dict": {**model.state_dict(), "extra": _TouchOnUnpickle(marker)},
    }
    # The payload is live: an ordinary unpickle creates the marker.
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "x.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as fh:
            pickle.dump(payload, fh)

    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path, config=model.config)
    assert not marker.exists()


def test_plain_state_dict_pt_needs_config(tmp_path: Path) -> None:
    model = make_model(TIED)
    x = make_input(TIED)
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)

    with pytest.raises(CheckpointError, match="config"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, config=TIED)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    assert loaded.config == model.config


def test_pt_with_config_and_state_dict_loads(tmp_path: Path) -> None:
    model = make_model({**MLP, "norm": "weight"}, torch.float64)
    x = make_input(MLP, torch.float64)
    path = tmp_path / "bundle.pt"
    torch.save({"config": model.config, "state_dict": model.state_dict()}, path)

    loaded = load_checkpoint(path)

    assert loaded.config == model.config
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    assert json.loads(loaded.provenance["config"]) == model.config


def test_pt_that_is_not_a_dict_of_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(CheckpointError, match="dict of tensors"):
        load_checkpoint(path, config=MLP)


@pytest.mark.parametrize("config", ["mlp", ["mlp"], 3])
def test_pt_with_non_dict_config_raises_checkpoint_error(tmp_path: Path, config: object) -> None:
    path = tmp_path / "bundle.pt"
    torch.save({"config": config, "state_dict": make_model(MLP).state_dict()}, path)
    with pytest.raises(CheckpointError, match="config"):
        load_checkpoint(path)


def test_pt_state_dict_not_matching_config_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(make_model(MLP).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"layer\.W\.weight.*\(8, 8\).*\(9, 9\)"):
        load_checkpoint(path, config={**MLP, "hidden": 9})


# --- damaged files ----------------------------------------------------------------------------


def _cut_points(data: bytes) -> dict[str, int]:
    start, end = header_span(data)
    return {
        "empty": 0,
        "4_bytes": 4,
        "length_prefix_only": 8,
        "inside_header": (start + end) // 2,
        "header_only": end,
        "inside_data": (end + len(data)) // 2,
        "last_byte_missing": len(data) - 1,
    }


@pytest.mark.parametrize(
    "cut",
    [
        "empty",
        "4_bytes",
        "length_prefix_only",
        "inside_header",
        "header_only",
        "inside_data",
        "last_byte_missing",
    ],
)
def test_truncated_file_raises_checkpoint_error(saved: tuple[DEQModel, Path], cut: str) -> None:
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: _cut_points(data)[cut]])
    with pytest.raises(CheckpointError, match=UNREADABLE) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_bit_flip_in_tensor_data_fails_the_digest(saved: tuple[DEQModel, Path], where: str) -> None:
    _, path = saved
    data = bytearray(path.read_bytes())
    _, end = header_span(data)
    index = {"first": end, "middle": (end + len(data)) // 2, "last": len(data) - 1}[where]
    data[index] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"sha256.*corrupted"):
        load_checkpoint(path)


# Each target: a byte sequence in the header and the offset of the byte to flip inside it.
HEADER_TARGETS = {
    "opening_brace": (b"{", 0),
    "dtype": (b'"dtype":"F32"', len(b'"dtype":"')),
    "shape": (b'"shape":[8,8]', len(b'"shape":[')),
    "data_offsets": (b'"data_offsets":[', len(b'"data_offsets":[')),
    "digest_value": (b'"sha256":"', len(b'"sha256":"') + 5),
    "format_version": (b'"deq_format_version":"1"', len(b'"deq_format_version":"')),
    "config_key_name": (b'\\"hidden\\"', len(b'\\"hid')),
    "config_structure": (b'"config":"{', len(b'"config":"')),
    "metadata_key": (b'"__metadata__"', len(b'"__meta')),
}


@pytest.mark.parametrize("target", list(HEADER_TARGETS))
def test_bit_flip_in_json_header_raises_checkpoint_error(
    saved: tuple[DEQModel, Path], target: str
) -> None:
    _, path = saved
    data = bytearray(path.read_bytes())
    start, end = header_span(data)
    needle, offset = HEADER_TARGETS[target]
    at = data.index(needle, start, end)
    data[at + offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize("value", [b'\\"input_scale\\": 1.0', b'\\"max_norm\\": 0.9'])
def test_bit_flip_in_config_value_raises_checkpoint_error(
    saved: tuple[DEQModel, Path], value: bytes
) -> None:
    _, path = saved
    data = bytearray(path.read_bytes())
    start, end = header_span(data)
    data[data.index(value, start, end) + len(value) - 1] ^= 0x01  # 1.0 -> 1.1, 0.9 -> 0.8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def _rewrite(
    src: Path,
    dst: Path,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    meta: dict[str, str] | None = None,
    redigest: bool = True,
) -> Path:
    """Copy a checkpoint with replaced tensors/metadata (digest recomputed unless told not to)."""
    orig_tensors, orig_meta = read_file(src)
    tensors = orig_tensors if tensors is None else tensors
    meta = dict(orig_meta if meta is None else meta)
    if redigest and "sha256" in meta:
        meta["sha256"] = checkpoint_digest(tensors, meta)
    save_file(tensors, dst, metadata=meta)
    return dst


def test_rewrite_helper_produces_a_loadable_copy(saved: tuple[DEQModel, Path]) -> None:
    """The helper the next tests use changes nothing by itself."""
    model, path = saved
    copy = _rewrite(path, path.with_name("copy.safetensors"))
    x = make_input(MLP)
    assert torch.equal(outputs(load_checkpoint(copy), x), outputs(model, x))


@pytest.mark.parametrize("redigest", [True, False], ids=["fresh_digest", "stale_digest"])
def test_wrong_shape_tensor_raises_checkpoint_error(
    saved: tuple[DEQModel, Path], redigest: bool
) -> None:
    _, path = saved
    tensors, _ = read_file(path)
    tensors["layer.W.weight"] = tensors["layer.W.weight"].reshape(4, 16).contiguous()
    bad = _rewrite(path, path.with_name("bad.safetensors"), tensors=tensors, redigest=redigest)
    # Shapes are checked from the header against the config before any tensor is read, so the
    # shape check fires (naming the tensor) whether or not the digest was recomputed.
    match = r"'layer\.W\.weight'.*\(4, 16\).*\(8, 8\)"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(bad)


@pytest.mark.parametrize("change", ["missing", "unexpected", "integer_dtype"])
def test_tensor_set_not_matching_config_names_the_tensor(
    saved: tuple[DEQModel, Path], change: str
) -> None:
    _, path = saved
    tensors, _ = read_file(path)
    if change == "missing":
        del tensors["layer.out.bias"]
        match = r"missing tensor 'layer\.out\.bias'"
    elif change == "unexpected":
        tensors["layer.extra"] = torch.zeros(2)
        match = r"unexpected tensor 'layer\.extra'"
    else:
        tensors["layer.out.bias"] = tensors["layer.out.bias"].to(torch.int32)
        match = r"'layer\.out\.bias'.*int32"
    bad = _rewrite(path, path.with_name("bad.safetensors"), tensors=tensors)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(bad)


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_metadata_key_raises_checkpoint_error(
    saved: tuple[DEQModel, Path], key: str
) -> None:
    _, path = saved
    _, meta = read_file(path)
    del meta[key]
    bad = _rewrite(path, path.with_name("bad.safetensors"), meta=meta)
    with pytest.raises(CheckpointError, match=key):
        load_checkpoint(bad)


def test_file_without_metadata_is_not_a_deq_checkpoint(saved: tuple[DEQModel, Path]) -> None:
    _, path = saved
    tensors, _ = read_file(path)
    bad = path.with_name("plain.safetensors")
    save_file(tensors, bad)
    with pytest.raises(CheckpointError, match="not a deq-serve checkpoint"):
        load_checkpoint(bad)


@pytest.mark.parametrize("version", ["0", "2", "1.0", ""])
def test_unsupported_format_version_raises_checkpoint_error(
    saved: tuple[DEQModel, Path], version: str
) -> None:
    _, path = saved
    _, meta = read_file(path)
    meta["deq_format_version"] = version
    bad = _rewrite(path, path.with_name("bad.safetensors"), meta=meta)
    with pytest.raises(CheckpointError, match="deq_format_version"):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('"mlp"', "JSON object"),
        (json.dumps({**MLP, "hidden": 0}), "invalid model config"),
        (json.dumps({**MLP, "cell": "rnn"}), "invalid model config"),
        (json.dumps({**MLP, "solver": {"method": "newton"}}), "unknown method"),
        (json.dumps({**MLP, "solver": {"tol": -1}}), "tol"),
        (json.dumps({**MLP, "solver": {"no_such_option": 1}}), "no_such_option"),
    ],
)
def test_bad_config_metadata_raises_checkpoint_error(
    saved: tuple[DEQModel, Path], config: str, match: str
) -> None:
    _, path = saved
    _, meta = read_file(path)
    meta["config"] = config
    bad = _rewrite(path, path.with_name("bad.safetensors"), meta=meta)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(bad)


@pytest.mark.parametrize("name", ["model.bin", "model.pth", "model.ckpt", "model", "model.PT"])
def test_unsupported_suffix_raises_checkpoint_error(
    saved: tuple[DEQModel, Path], name: str
) -> None:
    """The suffix alone decides: valid safetensors bytes under another name are refused."""
    _, path = saved
    other = path.with_name(name)
    other.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="suffix"):
        load_checkpoint(other)


# --- atomic save ------------------------------------------------------------------------------


@pytest.mark.parametrize("fail", ["replace", "fsync"])
def test_crash_before_rename_keeps_old_checkpoint_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    a, b = make_model(MLP), make_model({**MLP, "activation": "relu"})
    x = make_input(MLP)
    assert not torch.equal(outputs(a, x), outputs(b, x))
    path = tmp_path / "model.safetensors"
    save_checkpoint(a, path)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError(f"simulated crash in os.{fail}")

    with monkeypatch.context() as m:
        m.setattr(os, fail, crash)
        with pytest.raises(OSError, match="simulated crash"):
            save_checkpoint(b, path)

    assert os.listdir(tmp_path) == [path.name]
    loaded = load_checkpoint(path)
    assert loaded.config == a.config
    assert torch.equal(outputs(loaded, x), outputs(a, x))


def test_second_save_replaces_the_first(tmp_path: Path) -> None:
    a, b = make_model(MLP), make_model({**MLP, "activation": "relu"})
    x = make_input(MLP)
    path = tmp_path / "model.safetensors"
    save_checkpoint(a, path)
    save_checkpoint(b, path, parent="a")

    loaded = load_checkpoint(path)

    assert os.listdir(tmp_path) == [path.name]
    assert loaded.config == b.config
    assert loaded.provenance["parent"] == "a"
    assert torch.equal(outputs(loaded, x), outputs(b, x))
    assert not torch.equal(outputs(loaded, x), outputs(a, x))


@pytest.mark.parametrize("existing", [False, True], ids=["new_file", "replaced_file"])
def test_saved_file_is_readable_by_others(tmp_path: Path, existing: bool) -> None:
    """0o644 like a plainly created file (umask 022), not the 0o600 of the temp file it was."""
    path = tmp_path / "model.safetensors"
    if existing:
        path.write_bytes(b"old")
        path.chmod(0o600)
    old = os.umask(0o022)
    try:
        save_checkpoint(make_model(MLP), path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# --- error type -------------------------------------------------------------------------------


def test_checkpoint_error_is_a_value_error(tmp_path: Path) -> None:
    assert issubclass(CheckpointError, ValueError)
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(path)

"""Hostile `.pt2` packages: each attack is refused with a CheckpointError naming it, and no code
from the file ever runs. Where torch's own loader would run the attack's code, a control test
shows it does (so the gadget is live and the refusal is what protects us)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest
import sympy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from package_tools import (
    Members,
    edit_json,
    export_gated,
    gadget_bytes,
    gated_modules,
    read_members,
    rewrite,
    two_faced_zip,
    write_members,
    zip_bytes,
)
from torch.export.pt2_archive._package import load_pt2

from deq_server.core import CheckpointError, export_deq, load_checkpoint
from deq_server.core._package import save_package
from deq_server.core._package_scan import PackageRefusedError, check_expression

WEIGHTS_CFG = "data/weights/cell_weights_config.json"
CONSTANTS_CFG = "data/constants/cell_constants_config.json"
CELL_GRAPH = "models/cell.json"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pkg") / "gated.pt2"
    export_gated(path)
    return path


def refused(path: Path, *words: str, max_bytes: int | None = None) -> str:
    kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


def test_the_untouched_package_loads(package: Path) -> None:
    model = load_checkpoint(package)
    assert model.config["cell"] == "exported"
    assert model.output_shape == (3,)


# --- code in the file ------------------------------------------------------------------------


def _pickled_weight(marker: Path) -> object:
    def edit(m: Members) -> None:
        def change(cfg: dict) -> None:  # type: ignore[type-arg]
            entry = next(iter(cfg["config"].values()))
            entry["use_pickle"] = True
            m[f"data/weights/{entry['path_name']}"] = gadget_bytes(marker)

        edit_json(m, WEIGHTS_CFG, change)

    return edit


def test_pickle_gadget_in_the_weights_never_runs(package: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = rewrite(package, tmp_path / "bad.pt2", _pickled_weight(marker), reseal=False)  # type: ignore[arg-type]
    refused(bad, "pickled")
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017, PT011  # control: torch alone runs the gadget
        load_pt2(str(bad))
    assert marker.exists()


def test_pickle_gadget_in_the_constants_never_runs(package: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    def edit(m: Members) -> None:
        def change(cfg: dict) -> None:  # type: ignore[type-arg]
            entry = next(iter(cfg["config"].values()))
            entry["path_name"], entry["use_pickle"] = "opaque_obj_0", True
            m["data/constants/opaque_obj_0"] = gadget_bytes(marker)

        edit_json(m, CONSTANTS_CFG, change)

    bad = rewrite(package, tmp_path / "bad.pt2", edit, reseal=False)
    refused(bad)
    assert not marker.exists()
    with contextlib.suppress(Exception):  # control: torch pickle.loads it
        load_pt2(str(bad))
    assert marker.exists()


def test_pickle_gadget_in_the_sample_inputs_never_runs(package: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    def edit(m: Members) -> None:
        m["data/sample_inputs/cell.pt"] = gadget_bytes(marker)

    bad = rewrite(package, tmp_path / "bad.pt2", edit, reseal=False)
    load_checkpoint(bad)  # sample inputs are never read: torch gets them empty
    assert not marker.exists()
    # control: torch falls back to full unpickling when weights-only refuses (and may fail after)
    with contextlib.suppress(Exception):
        load_pt2(str(bad))
    assert marker.exists()


def test_guard_code_from_the_file_never_runs(package: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    guard = f"L['z'].size()[0] == L['u'].size()[0] and open({str(marker)!r}, 'w') is not None"

    def edit(m: Members) -> None:
        edit_json(m, CELL_GRAPH, lambda g: g.__setitem__("guards_code", [guard]))
        buf = io.BytesIO()  # torch generates guard code only for programs with sample inputs
        torch.save(((torch.zeros(2, 8), torch.zeros(2, 8)), {}), buf)
        m["data/sample_inputs/cell.pt"] = buf.getvalue()

    bad = rewrite(package, tmp_path / "bad.pt2", edit, reseal=True)
    model = load_checkpoint(bad)  # guards are never generated: shapes are checked by the server
    model(torch.zeros(2, 6))
    assert not marker.exists()
    cell = load_pt2(str(bad)).exported_programs["cell"].module()  # control: torch execs the guard
    cell(torch.zeros(2, 8), torch.zeros(2, 8))
    assert marker.exists()


def test_code_in_a_shape_expression_is_refused(package: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    gadget = f"open({str(marker)!r}, 'w')"

    def edit(m: Members) -> None:
        def change(graph: dict) -> None:  # type: ignore[type-arg]
            values = graph["graph_module"]["graph"]["tensor_values"]
            sizes = next(
                v["sizes"] for v in values.values() if v["sizes"] and "as_expr" in v["sizes"][0]
            )
            sizes[0]["as_expr"]["expr_str"] = gadget

        edit_json(m, CELL_GRAPH, change)

    bad = rewrite(package, tmp_path / "bad.pt2", edit, reseal=False)
    refused(bad, "shape expression", "'open'")
    assert not marker.exists()


@pytest.mark.parametrize(
    "text",
    [
        "Symbol('s27', positive=True, integer=True)",
        "Add(Mul(Integer(2), Symbol('s0')), Integer(-1))",
        "Max(1, s0) // 2",
    ],
)
def test_plain_shape_expressions_pass(text: str) -> None:
    check_expression(text)


_TOKENS = [
    "open(", "'m'", "'w'", ",", ")", "(", "Symbol(", "'s0'", "s0", "+", "*", "//", "__import__",
    "Integer(", "2", "positive=True", ".", "__class__", "exec", "chr(", "95", "[", "]", "lambda",
]  # fmt: skip


@given(st.lists(st.sampled_from(_TOKENS), max_size=12).map("".join))
@settings(max_examples=300, deadline=None)
def test_an_accepted_expression_is_safe_to_sympify(text: str) -> None:
    """Whatever the scan accepts, sympify (which evaluates Python) can only build sympy values:
    the tokens that would reach Python (open, exec, chr, dunders, attributes) never pass."""
    try:
        check_expression(text)
    except PackageRefusedError:
        return
    assert not re.search(r"\b(open|exec|chr|lambda)\b|__|\[", text)  # whole names only
    assert not re.search(r"[A-Za-z_)\]']\s*\.", text)  # no attribute access (a float may pass)
    with contextlib.suppress(sympy.SympifyError, TypeError, SyntaxError, ValueError):
        sympy.sympify(text)


def test_a_custom_operator_is_refused_by_name(package: Path, tmp_path: Path) -> None:
    def edit(m: Members) -> None:
        def change(graph: dict) -> None:  # type: ignore[type-arg]
            node = graph["graph_module"]["graph"]["nodes"][0]
            node["target"] = "torch.ops.evil_lib.launch.default"

        edit_json(m, CELL_GRAPH, change)

    bad = rewrite(package, tmp_path / "bad.pt2", edit, reseal=False)
    refused(bad, "torch.ops.evil_lib.launch.default")


def test_a_compiled_artefact_is_refused(package: Path, tmp_path: Path) -> None:
    def edit(m: Members) -> None:
        m["data/aotinductor/model/model.so"] = b"\x7fELF"

    refused(rewrite(package, tmp_path / "bad.pt2", edit, reseal=False), "compiled", ".so")


# --- sizes -----------------------------------------------------------------------------------


def test_a_zip_bomb_is_refused_without_inflating_it(package: Path, tmp_path: Path) -> None:
    root, members = read_members(package)
    members["data/weights/weight_0"] = bytes(200 << 20)  # 200 MB of zeros, ~200 KB deflated
    bad = tmp_path / "bomb.pt2"
    write_members(bad, root, members, compress={"data/weights/weight_0"})
    assert bad.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        refused(bad, "compressed")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20


def test_a_file_above_the_cap_is_refused_unread(package: Path) -> None:
    refused(package, "above the cap", max_bytes=package.stat().st_size - 1)


def test_an_empty_record_with_a_huge_shape_is_refused(package: Path, tmp_path: Path) -> None:
    def edit(m: Members) -> None:
        def change(cfg: dict) -> None:  # type: ignore[type-arg]
            entry = next(iter(cfg["config"].values()))
            entry["tensor_meta"]["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 20}]
            entry["tensor_meta"]["strides"] = [{"as_int": 1 << 20}, {"as_int": 1}]
            m[f"data/weights/{entry['path_name']}"] = b""

        edit_json(m, WEIGHTS_CFG, change)

    refused(rewrite(package, tmp_path / "bad.pt2", edit, reseal=False), "its record has 0")


def test_deeply_nested_metadata_is_refused(package: Path, tmp_path: Path) -> None:
    def edit(m: Members) -> None:
        m["extra/deq.json"] = b"[" * 100_000 + b"]" * 100_000

    refused(rewrite(package, tmp_path / "bad.pt2", edit, reseal=False), "JSON")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_only_regular_files_are_read(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.pt2"
    if kind == "fifo":
        os.mkfifo(path)  # a blocking open would hang forever
    else:
        path.symlink_to("/dev/zero")  # reading it would never end
    refused(path, "not a regular file")


# --- contents that disagree ------------------------------------------------------------------


def test_metadata_shapes_that_disagree_with_the_programs(package: Path, tmp_path: Path) -> None:
    def edit(m: Members) -> None:
        def change(meta: dict) -> None:  # type: ignore[type-arg]
            config = json.loads(meta["config"])
            config["output_shape"] = [4]
            meta["config"] = json.dumps(config, sort_keys=True)

        edit_json(m, "extra/deq.json", change)

    refused(rewrite(package, tmp_path / "bad.pt2", edit, reseal=True), "'head' returns")


def test_a_missing_program_is_refused(package: Path, tmp_path: Path) -> None:
    def edit(m: Members) -> None:
        for name in [n for n in m if "head" in n]:
            del m[name]

    refused(rewrite(package, tmp_path / "bad.pt2", edit, reseal=False), "programs")


def test_a_flipped_weight_byte_fails_the_digest(package: Path, tmp_path: Path) -> None:
    def edit(m: Members) -> None:
        data = bytearray(m["data/weights/weight_0"])
        data[0] ^= 0x01
        m["data/weights/weight_0"] = bytes(data)

    refused(rewrite(package, tmp_path / "bad.pt2", edit, reseal=False), "sha256")


def test_non_finite_weights_are_refused(package: Path, tmp_path: Path) -> None:
    model = load_checkpoint(package)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    save_package(model, tmp_path / "nan.pt2")
    refused(tmp_path / "nan.pt2", "non-finite")


@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_corrupted_byte_loads_or_is_refused_cleanly(
    package: Path, tmp_path: Path, position: int, value: int
) -> None:
    data = bytearray(package.read_bytes())
    data[position % len(data)] = value
    path = tmp_path / "fuzz.pt2"
    path.write_bytes(bytes(data))
    with contextlib.suppress(CheckpointError):
        load_checkpoint(path)


def test_an_unknown_zip_version_is_refused_cleanly(package: Path, tmp_path: Path) -> None:
    """Found by the fuzz test above: zipfile raises NotImplementedError for a "version needed to
    extract" it does not know (here 6.4, in the first central-directory entry)."""
    data = bytearray(package.read_bytes())
    data[data.index(b"PK\x01\x02") + 6] = 64
    path = tmp_path / "version.pt2"
    path.write_bytes(bytes(data))
    refused(path, "corrupt archive")


def test_torch_stores_package_members_uncompressed(package: Path) -> None:
    """The scan refuses compressed members; torch must keep writing them stored."""
    with zipfile.ZipFile(package) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}


# --- found by the hostile review: names, two-faced archives, impure or unbounded graphs ------


def test_a_name_that_is_python_code_is_refused(package: Path, tmp_path: Path) -> None:
    """torch.fx pastes names into the source it generates and runs: a placeholder named
    `q=open(...)` would become a default argument, evaluated as the program is built."""
    marker = tmp_path / "ran"
    name = f"q=open({str(marker)!r}, 'w')"

    def edit(m: Members) -> None:
        def change(graph: dict) -> None:  # type: ignore[type-arg]
            g = graph["graph_module"]["graph"]
            g["inputs"].append({"as_tensor": {"name": name}})
            g["tensor_values"][name] = next(iter(g["tensor_values"].values()))

        edit_json(m, "models/head.json", change)

    refused(rewrite(package, tmp_path / "bad.pt2", edit, reseal=False), "not a plain name")
    assert not marker.exists()


def test_a_weight_name_that_is_python_code_is_refused(package: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    fqn = f'weight") if open({str(marker)!r}, "w") else getattr(self, "weight'

    def edit(m: Members) -> None:
        def change(cfg: dict) -> None:  # type: ignore[type-arg]
            first = next(iter(cfg["config"]))
            cfg["config"][fqn] = cfg["config"].pop(first)

        edit_json(m, "data/weights/head_weights_config.json", change)

    refused(rewrite(package, tmp_path / "bad.pt2", edit, reseal=False), "not a plain name")
    assert not marker.exists()


def test_an_archive_with_two_faces_is_read_as_it_was_checked(package: Path, tmp_path: Path) -> None:
    """zipfile sees the clean package, torch's own reader a hostile one: torch is handed the
    archive rebuilt from what was checked, so the hostile face is never read."""
    marker = tmp_path / "ran"
    root, clean = read_members(package)
    hostile = dict(clean)

    def change(cfg: dict) -> None:  # type: ignore[type-arg]
        entry = next(iter(cfg["config"].values()))
        entry["path_name"], entry["use_pickle"] = "opaque_obj_0", True

    edit_json(hostile, CONSTANTS_CFG, change)
    hostile["data/constants/opaque_obj_0"] = gadget_bytes(marker)
    bad = tmp_path / "two_faced.pt2"
    bad.write_bytes(two_faced_zip(zip_bytes(root, hostile), zip_bytes(root, clean)))
    with zipfile.ZipFile(bad) as zf:  # Python's reader sees the clean face
        assert not any("opaque" in n for n in zf.namelist())
    load_checkpoint(bad)
    assert not marker.exists()
    with contextlib.suppress(Exception):  # control: torch's reader, given the file, runs it
        load_pt2(str(bad))
    assert marker.exists()


def _node_edit(program: str, change_node: Any) -> Any:
    def edit(m: Members) -> None:
        def change(graph: dict) -> None:  # type: ignore[type-arg]
            change_node(graph["graph_module"]["graph"]["nodes"])

        edit_json(m, f"models/{program}.json", change)

    return edit


@pytest.mark.parametrize(
    ("target", "word"),
    [
        ("torch.ops.aten.from_file.default", "touches files"),
        ("torch.ops.aten.add_.Tensor", "writes its argument"),
        ("torch.ops.aten.copy_.default", "writes its argument"),
        ("torch.ops.aten.no_such_op.default", "unknown operator"),
        ("_operator.__builtins__.get", "calls"),
    ],
)
def test_impure_or_unknown_operators_are_refused(
    package: Path, tmp_path: Path, target: str, word: str
) -> None:
    def change(nodes: list) -> None:  # type: ignore[type-arg]
        nodes[0]["target"] = target

    refused(rewrite(package, tmp_path / "bad.pt2", _node_edit("head", change), reseal=False), word)


def test_a_constant_size_beyond_the_cap_is_refused(package: Path, tmp_path: Path) -> None:
    def change(nodes: list) -> None:  # type: ignore[type-arg]
        nodes[0]["inputs"].append({"name": "size", "arg": {"as_ints": [2**28]}, "kind": 1})

    bad = rewrite(package, tmp_path / "bad.pt2", _node_edit("head", change), reseal=False)
    refused(bad, "size above")


def test_a_power_in_a_shape_expression_is_refused() -> None:
    with pytest.raises(PackageRefusedError, match="power"):
        check_expression("Symbol('s31', positive=True, integer=True) + 0*10**10**7")
    with pytest.raises(PackageRefusedError):
        check_expression("s0 + " + "9" * 40)


@pytest.mark.parametrize("where", ["inject", "head"])
def test_rows_mixed_in_any_program_are_refused(tmp_path: Path, where: str) -> None:
    class RowMean(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.inner(x)
            return out + out.mean(dim=0, keepdim=True)

    inject, cell, head = gated_modules()
    inject, head = (RowMean(inject), head) if where == "inject" else (inject, RowMean(head))
    with pytest.raises(ValueError, match=f"'{where}' mixes the rows"):
        export_deq(
            tmp_path / "m.pt2", inject=inject, cell=cell, head=head, example_input=torch.randn(4, 6)
        )


def test_a_package_without_parameters_is_refused_cleanly(tmp_path: Path) -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :3] * 2.0

    class Cell(torch.nn.Module):
        def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return torch.tanh(0.5 * z + u)

    with pytest.raises(ValueError, match="no parameters"):
        export_deq(
            tmp_path / "free.pt2", inject=Broken(), cell=Cell(), head=Broken(),
            example_input=torch.randn(2, 6),
        )  # fmt: skip


class _Costly(torch.nn.Module):
    """The gated cell plus a term of zeros that costs what `make(z)` costs."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.inner = gated_modules()[1]
        self.make = make

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.inner(z, u) + self.make(z).sum() * 0.0


def _export_costly(path: Path, make: Any) -> Path:
    inject, _, head = gated_modules()
    export_deq(path, inject=inject, cell=_Costly(make), head=head, example_input=torch.randn(4, 6))
    return path


def test_sizes_that_compose_into_a_memory_bomb_are_refused(tmp_path: Path) -> None:
    """Two repeats by 1024 each pass the per-size cap; together they would take 34 GB at 1,024
    rows (100 MB on the three rows of the probe). Refused from fake tensors, in a process whose
    peak memory moves by less than the probe alone would take."""
    path = _export_costly(tmp_path / "bomb.pt2", lambda z: z.repeat(1, 1024).repeat(1, 1024))
    good = tmp_path / "good.pt2"
    export_gated(good)
    code = (  # a good package first, so that torch's export modules are imported already
        "import resource, sys; from deq_server.core import load_checkpoint, CheckpointError\n"
        "load_checkpoint(sys.argv[2])\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    load_checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(good)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "'cell' at 1024 rows" in out[0], out
    assert "bytes" in out[0], out
    assert int(out[-1]) < 16, out  # MB (the probe alone would take 100)
    assert load_checkpoint(path, max_rows=4, max_bytes=1 << 30)  # fine at a small batch


def test_a_size_that_grows_faster_than_the_batch_is_refused(tmp_path: Path) -> None:
    """n x n x n x 4096 zeros: harmless on the probe's three rows, 17 TB at 1,024."""

    def cube(z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        return z.new_zeros(n, n, n, 4096)

    refused(_export_costly(tmp_path / "cube.pt2", cube), "'cell' at 1024 rows", "bytes")


def test_too_many_flops_are_refused(tmp_path: Path) -> None:
    """An (n, n, 2**24) @ (2**24, 1) product of broadcast views (no memory): 3.5e13 FLOPs at
    1,024 rows, 3e8 on the probe's three."""

    def products(z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        a = z.new_ones(1, 1, 1).expand(n, n, 2**24)
        return a @ z.new_ones(1, 1).expand(2**24, 1)

    refused(_export_costly(tmp_path / "flops.pt2", products), "FLOPs")


def test_sizes_that_depend_on_values_are_refused(tmp_path: Path) -> None:
    path = _export_costly(tmp_path / "nonzero.pt2", lambda z: torch.nonzero(z > 0).float())
    refused(path, "cannot be computed from the input shapes")


def test_shape_arithmetic_that_can_shrink_is_refused(tmp_path: Path) -> None:
    """With subtraction a size can be empty on the probe's rows and huge at other batches, and
    checking the largest batch bounds the rest only if sizes grow with the batch: so only + and
    * are admitted in shape arithmetic."""

    def shrink(z: torch.Tensor) -> torch.Tensor:
        return z.new_zeros((z.shape[0] - 1) * 1000, 1000)

    with pytest.raises(PackageRefusedError, match=r"calls '_operator\.sub'"):  # the same scan loads
        _export_costly(tmp_path / "sub.pt2", shrink)

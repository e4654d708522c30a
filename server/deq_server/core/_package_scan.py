"""Everything checked in a `.pt2` package before torch reads a byte of it.

torch's own loader is not safe on untrusted files: it unpickles weights and constants marked
`use_pickle` with `weights_only=False`, `pickle.loads` opaque constants, loads compiled
AOTInductor libraries, evaluates shape expressions with `sympy.sympify` (which is `eval`), pastes
names into Python source that torch.fx generates and runs, and `exec`s guard code. So the
archive is read here first with Python's `zipfile`, and refused unless:

- it is a regular file within the size cap, every member stored uncompressed (as torch writes
  them), so the bytes on disk bound the bytes read: no zip bomb;
- every member is one a deq-serve package needs (no compiled artefact, no pickle; the sample
  inputs, a pickle of their own, are emptied in the archive torch is given);
- it holds exactly the three programs `inject`, `cell`, `head`, whose weights and constants are
  raw CPU tensors whose declared sizes match their records, within the byte cap in all;
- every graph operator is one of PyTorch's own and pure (writes none of its inputs, touches no
  file), every name a plain identifier, every constant size and the node count bounded, and
  every shape expression arithmetic on shape symbols (nothing `sympify` could turn into a call
  or a huge number).

The result is what the loader needs next: the parsed metadata, the declared tensor bytes, the
graphs' digests and the archive rebuilt from exactly the members checked (what torch reads:
Python's zip reader and torch's can be made to see different members in one file).
"""

from __future__ import annotations

import hashlib
import io
import json
import keyword
import math
import os
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PROGRAMS = ("inject", "cell", "head")
METADATA_MEMBER = "extra/deq.json"
# Members besides the programs' own (models/, data/weights/, data/constants/, data/sample_inputs/).
_FIXED_MEMBERS = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    METADATA_MEMBER,
}
_PROGRAM_MEMBER = re.compile(
    r"^(?:models/(?P<model>\w+)\.json"
    r"|data/weights/(?P<wcfg>\w+)_weights_config\.json"
    r"|data/constants/(?P<ccfg>\w+)_constants_config\.json"
    r"|data/sample_inputs/(?P<sample>\w+)\.pt"
    r"|data/weights/(?P<weight>weight_\d+)"
    r"|data/constants/(?P<const>tensor_\d+))$"
)
_COMPILED = re.compile(r"(\.(so|dll|dylib|pyd|o|a|cubin|ptx|fatbin|hsaco|py|pyc)$|aotinductor/)")
# Operators: PyTorch's own (aten, prims), resolved to their schemas; none that writes its
# inputs (a program must be a pure function of them: a mutated constant makes answers depend
# on earlier requests) or touches files; `_operator` only for getitem and shape arithmetic.
_OP = re.compile(r"^torch\.ops\.(aten|prims)\.(_{0,2}[a-z][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
# Shape arithmetic only adds and multiplies, so that every size grows with the batch and the
# cost check at the largest batch (`_package_cost`) bounds all smaller ones.
_PY_OPS = {
    "getitem", "add", "mul", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_",
}  # fmt: skip
_DENIED_OPS = {"from_file", "_from_file", "save", "load"}
_MUTATION_ALLOWED = {"detach_"}  # how export marks a lifted constant's fresh copy
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_KEYS = {
    "name", "arg_name", "parameter_name", "buffer_name", "tensor_constant_name",
    "custom_obj_name", "input_name", "output_name", "target_name",
}  # fmt: skip
_NAMED_MAPS = {
    "tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values",
    "custom_obj_values",
}  # fmt: skip
MAX_NODES = 20_000
MAX_LIST_ELEMENTS = 1 << 26  # an int list argument (a size) may ask for at most this many
# Shape expressions: numbers, shape symbols (s0, u3, ...), arithmetic and a few sympy functions.
# Shape expressions (sympy's srepr form: Symbol('s0', positive=True, integer=True), Add(...)):
# numbers, quoted symbol names, a few sympy names and keyword flags, operators and parentheses.
# Numbers have at most 19 digits and there is no power: `0*10**10**7` would keep sympy busy
# for seconds, `10**10**9` for hours.
_EXPR_TOKEN = re.compile(
    r"\s*(?:(\d{1,19}(?:\.\d{1,19})?(?:e[+-]?\d{1,3})?(?!\d))|'([a-z]{1,4}\d+)'|([A-Za-z]\w*)"
    r"|(//|[-+*/%(),<>=!]=?))"
)
_EXPR_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Max", "Min", "Eq", "Ne",
    "Lt", "Le", "Gt", "Ge", "GreaterThan", "LessThan", "StrictGreaterThan", "StrictLessThan",
    "And", "Or", "Not", "Mod", "FloorDiv", "CeilToInt", "PythonMod",
    "ModularIndexing", "CleanDiv", "IntTrueDiv", "FloatTrueDiv", "TruncToInt", "ToFloat",
    "Identity", "Pow", "oo", "True", "False", "positive", "negative", "nonnegative",
    "nonpositive", "integer", "real", "finite", "infinite", "zero", "nonzero", "commutative",
    "even", "odd",
}  # fmt: skip
_SYMBOL = re.compile(r"^[a-z]{1,4}\d+$")
# A power is harmless only as a symbol to a small integer (the stride of an n x n x k tensor).
_SMALL_POW = re.compile(
    r"Pow\(Symbol\('[a-z]{1,4}\d+'(?:, \w+=(?:True|False))*\), Integer\((\d{1,2})\)\)"
)
MAX_EXPONENT = 8
# torch._export.serde.schema.ScalarType codes -> element size: bool, integer and float dtypes.
_DTYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 12: 1, 13: 2}
MAX_MEMBERS = 4096
MAX_JSON_BYTES = 64 << 20


class PackageRefusedError(ValueError):
    """The package breaks one of the rules above; the message names which."""


@dataclass
class Scan:
    """What the scan learnt: the deq metadata (all strings), the bytes the programs' tensors
    declare, the sha256 of each program's serialized graph (covered by the package digest),
    and the archive rebuilt from the members checked (what torch then reads)."""

    metadata: dict[str, str]
    tensor_bytes: int
    graph_sha256: dict[str, str]
    canonical: bytes


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes` (a FIFO, a device or a
    link to one is refused without reading: opened non-blocking, checked with fstat)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PackageRefusedError("not a regular file")
        if st.st_size > max_bytes:
            raise PackageRefusedError(f"file is {st.st_size} bytes, above the cap of {max_bytes}")
        data = fh.read(st.st_size + 1)  # not max_bytes + 1: read() allocates what it is asked
    if len(data) > st.st_size:
        raise PackageRefusedError("file grew while it was read")
    return data


def _json(zf: zipfile.ZipFile, name: str) -> Any:
    info = zf.getinfo(name)
    if info.file_size > MAX_JSON_BYTES:
        raise PackageRefusedError(f"{name} is {info.file_size} bytes, above {MAX_JSON_BYTES}")
    try:
        return json.loads(zf.read(info))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise PackageRefusedError(f"{name} is not valid JSON: {str(exc)[:200]}") from None


def _members(zf: zipfile.ZipFile, max_bytes: int) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    infos = zf.infolist()
    if not infos or len(infos) > MAX_MEMBERS:
        raise PackageRefusedError(f"{len(infos)} archive members (1..{MAX_MEMBERS} allowed)")
    root = infos[0].filename.split("/", 1)[0]
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        head, _, rest = info.filename.partition("/")
        if head != root or not rest:
            raise PackageRefusedError(
                f"member {info.filename!r} is outside the archive root {root!r}"
            )
        if _COMPILED.search(rest):
            raise PackageRefusedError(f"compiled or code artefact {rest!r} in the archive")
        if info.compress_type != zipfile.ZIP_STORED:
            raise PackageRefusedError(f"member {rest!r} is compressed; torch stores members as is")
        if rest in members:
            raise PackageRefusedError(f"member {rest!r} appears twice")
        total += info.file_size
        if total > max_bytes:
            raise PackageRefusedError(f"members total more than the cap of {max_bytes} bytes")
        if rest not in _FIXED_MEMBERS and not _PROGRAM_MEMBER.match(rest):
            raise PackageRefusedError(f"unexpected member {rest!r} in the archive")
        members[rest] = info
    return root, members


def _programs(members: dict[str, zipfile.ZipInfo]) -> None:
    found: dict[str, set[str]] = {}
    for rest in members:
        m = _PROGRAM_MEMBER.match(rest)
        if m is None:
            continue
        for kind in ("model", "wcfg", "ccfg", "sample"):
            if m.group(kind):
                found.setdefault(kind, set()).add(m.group(kind))
    if found.get("model", set()) != set(PROGRAMS):
        raise PackageRefusedError(
            f"programs {sorted(found.get('model', set()))}, expected exactly {list(PROGRAMS)}"
        )
    for kind in ("wcfg", "ccfg", "sample"):
        extra = found.get(kind, set()) - set(PROGRAMS)
        if extra:
            raise PackageRefusedError(f"files of unknown programs {sorted(extra)}")
    if METADATA_MEMBER not in members:
        raise PackageRefusedError(f"no {METADATA_MEMBER}: not a deq-serve package")


def _tensor_entries(
    zf: zipfile.ZipFile, root: str, members: dict[str, zipfile.ZipInfo], folder: str, cfg: str
) -> int:
    """Check a weights or constants config; returns the bytes its tensors declare."""
    config = _json(zf, f"{root}/{cfg}") if cfg in members else {"config": {}}
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise PackageRefusedError(f"{cfg}: no 'config' object")
    total = 0
    for fqn, meta in entries.items():
        _check_name(cfg, fqn, dotted=True)
        if not isinstance(meta, dict):
            raise PackageRefusedError(f"{cfg}: entry {fqn!r} is not an object")
        if meta.get("use_pickle") is not False:
            raise PackageRefusedError(f"{cfg}: {fqn!r} is pickled; only raw tensors are accepted")
        path_name = meta.get("path_name")
        prefix = "weight_" if folder == "weights" else "tensor_"
        if not isinstance(path_name, str) or not re.fullmatch(prefix + r"\d+", path_name):
            raise PackageRefusedError(
                f"{cfg}: {fqn!r} is stored as {path_name!r}, not a raw tensor"
            )
        record = members.get(f"data/{folder}/{path_name}")
        if record is None:
            raise PackageRefusedError(f"{cfg}: {fqn!r} names missing record {path_name!r}")
        total += _check_tensor_meta(cfg, fqn, meta.get("tensor_meta"), record.file_size)
    return total


def _int(value: Any) -> int:
    if not isinstance(value, dict) or set(value) != {"as_int"}:
        raise PackageRefusedError("symbolic or malformed size")
    n = value["as_int"]
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**48:
        raise PackageRefusedError(f"size {n!r} out of range")
    return n


def _check_tensor_meta(cfg: str, fqn: str, meta: Any, record_bytes: int) -> int:
    if not isinstance(meta, dict):
        raise PackageRefusedError(f"{cfg}: {fqn!r} has no tensor_meta")
    device = meta.get("device")
    if not isinstance(device, dict) or device.get("type") != "cpu":
        raise PackageRefusedError(f"{cfg}: {fqn!r} is stored for device {device!r}; expected cpu")
    code = meta.get("dtype")
    element = _DTYPE_BYTES.get(code) if isinstance(code, int) else None
    if element is None:
        raise PackageRefusedError(f"{cfg}: {fqn!r} has unsupported dtype code {code!r}")
    try:
        sizes = [_int(s) for s in meta.get("sizes", [])]
        strides = [_int(s) for s in meta.get("strides", [])]
        offset = _int(meta.get("storage_offset"))
    except (PackageRefusedError, TypeError) as exc:
        raise PackageRefusedError(f"{cfg}: {fqn!r}: {exc}") from None
    if len(sizes) != len(strides) or len(sizes) > 8:
        raise PackageRefusedError(
            f"{cfg}: {fqn!r} has {len(sizes)} sizes and {len(strides)} strides"
        )
    numel = math.prod(sizes)
    # torch fills a tensor with an empty record with zeros of the declared size: a memory bomb
    # in a few bytes. So the last element the strided view reads must lie inside its record.
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))
        if (last + 1) * element > record_bytes:
            raise PackageRefusedError(
                f"{cfg}: {fqn!r} reads {(last + 1) * element} bytes, its record has {record_bytes}"
            )
    return numel * element


def _walk(value: Any, visit: Any) -> None:
    """Call visit(dict) on every dict of a JSON tree, iteratively (no recursion limit)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            visit(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_expression(text: Any) -> None:
    """Refuse a shape expression that is more than arithmetic on shape symbols: `sympify`
    evaluates it as Python, so names and calls are limited to a known few."""
    if not isinstance(text, str) or len(text) > 1000:
        raise PackageRefusedError(f"shape expression {str(text)[:80]!r} is not a short string")
    if "**" in text:
        raise PackageRefusedError(f"shape expression {text[:80]!r} raises to a power")
    small_powers = [m for m in _SMALL_POW.finditer(text) if int(m.group(1)) <= MAX_EXPONENT]
    if text.count("Pow(") != len(small_powers):
        raise PackageRefusedError(
            f"shape expression {text[:80]!r} has a power other than a shape symbol's "
            f"(exponent at most {MAX_EXPONENT})"
        )
    pos = 0
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise PackageRefusedError(f"shape expression {text[:80]!r} has a forbidden character")
        name = m.group(3)
        if name is not None and name not in _EXPR_NAMES and not _SYMBOL.match(name):
            raise PackageRefusedError(f"shape expression {text[:80]!r} names {name!r}")
        pos = m.end()


def _check_name(program: str, value: Any, dotted: bool = False) -> None:
    """Names end up in Python source that torch.fx generates and runs: identifiers only."""
    parts = value.split(".") if dotted and isinstance(value, str) else [value]
    if not all(isinstance(p, str) and _NAME.match(p) and not keyword.iskeyword(p) for p in parts):
        raise PackageRefusedError(f"program {program!r}: {str(value)[:80]!r} is not a plain name")


def _check_operator(program: str, target: Any) -> None:
    if isinstance(target, str) and target.startswith("_operator."):
        if target.removeprefix("_operator.") not in _PY_OPS:
            raise PackageRefusedError(f"program {program!r} calls {target[:80]!r}")
        return
    m = _OP.match(target) if isinstance(target, str) else None
    if m is None:
        raise PackageRefusedError(
            f"program {program!r} calls operator {str(target)[:80]!r}, outside PyTorch's own "
            "namespaces (aten, prims); custom operators are not served"
        )
    namespace, name, overload = m.groups()
    if name in _DENIED_OPS:
        raise PackageRefusedError(f"program {program!r} calls {target}, which touches files")
    try:
        schema = getattr(getattr(getattr(torch.ops, namespace), name), overload)._schema
    except (AttributeError, RuntimeError):
        raise PackageRefusedError(f"program {program!r} calls unknown operator {target}") from None
    writes = [
        a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
    ]
    if writes and name not in _MUTATION_ALLOWED:
        raise PackageRefusedError(
            f"program {program!r} calls {target}, which writes its argument {writes[0]!r} in "
            "place; programs must be pure functions of their inputs"
        )


def _check_argument(program: str, arg: Any) -> None:
    if not isinstance(arg, dict):
        return
    for kind in ("as_graph", "as_operator"):
        if kind in arg:
            raise PackageRefusedError(f"program {program!r} passes a {kind[3:]} as an argument")
    ints = arg.get("as_ints")
    if not (isinstance(ints, list) and all(isinstance(n, int) for n in ints)):
        return
    if (
        any(n > MAX_LIST_ELEMENTS for n in ints)
        or math.prod(max(n, 1) for n in ints) > MAX_LIST_ELEMENTS
    ):
        raise PackageRefusedError(
            f"program {program!r} asks for a size above {MAX_LIST_ELEMENTS} elements: {ints[:8]}"
        )


def check_graph(program: str, model: Any) -> None:
    """Every operator of the program's graph one of PyTorch's own and pure, every name a plain
    identifier, every expression plain arithmetic, every constant size bounded."""
    if not isinstance(model, dict) or not isinstance(model.get("graph_module"), dict):
        raise PackageRefusedError(f"models/{program}.json is not a serialized program")
    nodes = 0

    def visit(node: dict[str, Any]) -> None:
        nonlocal nodes
        if "target" in node and "inputs" in node and "outputs" in node:
            nodes += 1
            if nodes > MAX_NODES:
                raise PackageRefusedError(f"program {program!r} has over {MAX_NODES} nodes")
            _check_operator(program, node["target"])
            for named in node["inputs"] if isinstance(node["inputs"], list) else []:
                if isinstance(named, dict):
                    _check_argument(program, named.get("arg"))
        for key, value in node.items():
            if (key in _NAME_KEYS and isinstance(value, str)) or (
                key == "fqn" and isinstance(value, str) and value
            ):
                _check_name(program, value, dotted=True)
            elif (key in _NAMED_MAPS and isinstance(value, dict)) or (
                key == "forward_arg_names" and isinstance(value, list)
            ):
                for name in value:
                    _check_name(program, name)
        if "expr_str" in node:
            check_expression(node["expr_str"])

    _walk(model, visit)
    for key in model.get("range_constraints") or {}:
        check_expression(key)


def _scan(zf: zipfile.ZipFile, max_bytes: int) -> Scan:
    root, members = _members(zf, max_bytes)
    _programs(members)
    meta = _json(zf, f"{root}/{METADATA_MEMBER}")
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise PackageRefusedError(f"{METADATA_MEMBER} must be a JSON object of strings")
    total = 0
    graphs: dict[str, str] = {}
    for program in PROGRAMS:
        for folder, cfg in (
            ("weights", f"data/weights/{program}_weights_config.json"),
            ("constants", f"data/constants/{program}_constants_config.json"),
        ):
            total += _tensor_entries(zf, root, members, folder, cfg)
        if total > max_bytes:
            raise PackageRefusedError(f"tensors declare more than the cap of {max_bytes} bytes")
        name = f"{root}/models/{program}.json"
        check_graph(program, _json(zf, name))
        graphs[program] = hashlib.sha256(zf.read(name)).hexdigest()
    return Scan(
        metadata=meta,
        tensor_bytes=total,
        graph_sha256=graphs,
        canonical=_rebuild(zf, root, members),
    )


def _rebuild(zf: zipfile.ZipFile, root: str, members: dict[str, zipfile.ZipInfo]) -> bytes:
    """The archive written anew from exactly the members read here, for torch to read: its zip
    reader (miniz) and Python's can be made to see different members in one file (a second
    central directory, prepended data). Sample inputs are left empty: never used, and they are a
    pickle, and possibly a zip bomb, of their own."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as canonical:
        for name, info in members.items():
            data = b"" if name.startswith("data/sample_inputs/") else zf.read(info)
            canonical.writestr(f"{root}/{name}", data)
    return out.getvalue()


def scan_package(data: bytes, max_bytes: int) -> Scan:
    """Run every check above on a package's bytes; raises PackageRefusedError naming the first
    rule broken. The caller then hands torch these same bytes (no file swapped in between)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return _scan(zf, max_bytes)
    except PackageRefusedError:
        raise
    except (
        zipfile.BadZipFile,
        EOFError,
        KeyError,
        OSError,
        ValueError,
        NotImplementedError,  # zipfile: a "version needed" or compression it does not know
        struct.error,
        zlib.error,
    ) as exc:
        raise PackageRefusedError(f"corrupt archive: {str(exc)[:200]}") from None

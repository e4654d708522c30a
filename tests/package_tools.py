"""Small exported DEQs and a way to rewrite their `.pt2` members, for the package tests."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from deq_server.core import DEQModel, export_deq, load_checkpoint
from deq_server.core._package import _digest
from deq_server.core._package_scan import METADATA_MEMBER, scan_package


class GatedCell(nn.Module):
    """A cell none of the built-ins express: z' = g * tanh(LN(W z + u)) + (1 - g) * z / 2, with
    a gate g = sigmoid(G u) and a tensor constant (lifted by torch.export)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.norm = nn.LayerNorm(n)
        self.gate = nn.Linear(n, n)
        nn.init.normal_(self.lin.weight, std=0.3 / n**0.5)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate(u))
        offset = torch.tensor(0.01, dtype=z.dtype, device=z.device)
        return g * torch.tanh(self.norm(self.lin(z) + u)) + (1 - g) * z * 0.5 + offset


def gated_modules(
    in_features: int = 6, hidden: int = 8, out_features: int = 3, seed: int = 0
) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Linear(in_features, hidden), GatedCell(hidden), nn.Linear(hidden, out_features)


def export_gated(path: Path, dtype: torch.dtype = torch.float32, **kwargs: object) -> DEQModel:
    """Export the gated DEQ (6 inputs, hidden 8, 3 outputs) to `path`; returns it as loaded."""
    inject, cell, head = (m.to(dtype) for m in gated_modules())
    example = torch.randn(4, 6, dtype=dtype)
    return export_deq(path, inject=inject, cell=cell, head=head, example_input=example, **kwargs)


Members = dict[str, bytes]


def read_members(path: Path) -> tuple[str, Members]:
    """The archive root and every member's bytes, keyed by the path below the root."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        root = infos[0].filename.split("/", 1)[0]
        return root, {i.filename.split("/", 1)[1]: zf.read(i) for i in infos}


def write_members(
    path: Path, root: str, members: Members, compress: set[str] | frozenset[str] = frozenset()
) -> None:
    """Write members as torch does (stored), except those named in `compress` (deflated)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            kind = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
            zf.writestr(f"{root}/{name}", data, compress_type=kind)


def rewrite(src: Path, dst: Path, edit: Callable[[Members], None], *, reseal: bool) -> Path:
    """Copy the package at `src` to `dst` with `edit` applied to its members; `reseal` recomputes
    the sha256 (over the original tensors, the edited graphs and the edited metadata), so that
    the check under test, not the digest, is what refuses the file."""
    root, members = read_members(src)
    edit(members)
    if reseal:
        programs = load_checkpoint(src).layer.programs  # type: ignore[union-attr]
        meta = json.loads(members[METADATA_MEMBER])
        meta.pop("sha256")
        write_members(dst, root, members)
        graphs = scan_package(dst.read_bytes(), 1 << 62).graph_sha256
        meta["sha256"] = _digest(programs, graphs, meta)
        members[METADATA_MEMBER] = json.dumps(meta).encode()
    write_members(dst, root, members)
    return dst


def edit_json(members: Members, name: str, change: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    value = json.loads(members[name])
    change(value)
    members[name] = json.dumps(value).encode()


class Gadget:
    """A pickle that, when loaded, creates the file `marker` (harmless proof of execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def gadget_bytes(marker: Path) -> bytes:
    return pickle.dumps(Gadget(marker), protocol=2)


def zip_bytes(root: str, members: Members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(f"{root}/{name}", data)
    return buf.getvalue()


def _split(z: bytes) -> tuple[bytes, list[bytearray]]:
    """(the local records, the central directory entries) of a zip with no archive comment."""
    end = z.rindex(b"PK\x05\x06")
    _, _, _, _, n, size, off, _ = struct.unpack("<4sHHHHIIH", z[end : end + 22])
    cd, entries, p = z[off : off + size], [], 0
    while p < len(cd):
        nl, el, cl = struct.unpack("<HHH", cd[p + 28 : p + 34])
        entries.append(bytearray(cd[p : p + 46 + nl + el + cl]))
        p += 46 + nl + el + cl
    assert len(entries) == n
    return z[:off], entries


def _pad_comment(entry: bytearray, extra: int) -> bytearray:
    (cl,) = struct.unpack("<H", entry[32:34])
    struct.pack_into("<H", entry, 32, cl + extra)
    return bytearray(bytes(entry) + b" " * extra)


def two_faced_zip(hostile: bytes, benign: bytes) -> bytes:
    """One file that Python's zipfile reads as `benign` and torch's reader (miniz) as `hostile`:
    two central directories; zipfile finds the one before the end record and shifts offsets
    for the 'prepended' bytes, miniz takes the end record's offset as it is."""
    e_local, e_cd = _split(hostile)
    b_local, b_cd = _split(benign)
    if len(e_local) < len(b_local):
        e_local += b"\0" * (len(b_local) - len(e_local))
    s_e, s_b = sum(map(len, e_cd)), sum(map(len, b_cd))
    size = max(s_e, s_b)
    e_cd[-1] = _pad_comment(e_cd[-1], size - s_e)
    b_cd[-1] = _pad_comment(b_cd[-1], size - s_b)
    x_e = len(e_local)
    p_b = x_e + size
    concat = p_b + len(b_local) + size - size - x_e
    for entry in b_cd:
        (offset,) = struct.unpack("<I", entry[42:46])
        struct.pack_into("<I", entry, 42, p_b + offset - concat)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(e_cd), len(e_cd), size, x_e, 0)
    return e_local + b"".join(map(bytes, e_cd)) + b_local + b"".join(map(bytes, b_cd)) + end

"""The examples of the README and the tutorial run, so they cannot rot.

Every fenced code block of README.md and docs/tutorial.md runs against a live server started here
on 127.0.0.1 (free ports, a fresh model directory per page, seeded with the bundled demo). The
pages' addresses, 127.0.0.1:50051 (gRPC) and 127.0.0.1:9090 (metrics), are rewritten to the live
server's before a block runs, and `deqctl` finds it through DEQ_TARGET. ```python blocks run with
this interpreter, ```bash blocks with `bash -e -o pipefail`; the blocks of one page run in order
in one temporary folder, so a block may use the files an earlier one wrote. A block that cannot
run here (it installs packages, starts a server of its own, needs Docker) carries the comment
`<!-- not run: why -->` on the line before it; any other block, or a marker without a reason,
fails the test. Also checked: every relative link of README.md and docs/ leads to a file, and to
a heading of it where it names one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from promql_sources import REPO
from serving_harness import running_server

RUN_PAGES = ("README.md", "docs/tutorial.md")
DOC_PAGES = ("README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")))
GRPC_ADDRESS, METRICS_ADDRESS = "127.0.0.1:50051", "127.0.0.1:9090"
BLOCK_TIMEOUT_S = 60

_FENCE = re.compile(r"^[ \t]*```([^\n`]*)\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
_COMMENT_BEFORE = re.compile(r"<!--((?:(?!-->).)*)-->\s*\Z", re.S)
_NOT_RUN = re.compile(r"\s*not run:(.*)\Z", re.S)


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts, its language, its code, and why it is not run (None:
    it runs)."""

    where: str
    language: str
    code: str
    not_run: str | None


def blocks_of(text: str, page: str) -> list[Block]:
    """The fenced blocks of a Markdown page, in order. ValueError for a comment right before a
    block that is not a well-formed `<!-- not run: reason -->` with a reason."""
    found = []
    for match in _FENCE.finditer(text):
        where = f"{page}:{text.count(chr(10), 0, match.start()) + 1}"
        comment = _COMMENT_BEFORE.search(text, 0, match.start())
        not_run = None
        if comment is not None:
            marker = _NOT_RUN.match(comment.group(1))
            if marker is None or not marker.group(1).strip():
                raise ValueError(
                    f"{where}: the comment before the block must be `<!-- not run: reason -->`"
                    f" with a reason, got <!--{comment.group(1)}-->"
                )
            not_run = " ".join(marker.group(1).split())
        code = textwrap.dedent(match.group(2))
        found.append(Block(where, match.group(1).strip(), code, not_run))
    return found


def command_of(block: Block) -> list[str]:
    """How a block runs; ValueError for a block nothing here can run that is not marked."""
    if block.language == "python":
        return [sys.executable, "-c", block.code]
    if block.language == "bash":
        return ["bash", "-e", "-o", "pipefail", "-c", block.code]
    raise ValueError(
        f"{block.where}: a ```{block.language} block is neither run (python, bash) nor marked"
        " `<!-- not run: reason -->`"
    )


def run_block(block: Block, folder: Path, grpc_port: int, metrics_port: int) -> None:
    """Run one block in `folder` against the live server; AssertionError with its output if it
    fails."""
    live = {GRPC_ADDRESS: f"127.0.0.1:{grpc_port}", METRICS_ADDRESS: f"127.0.0.1:{metrics_port}"}
    code = block.code
    for written, actual in live.items():
        code = code.replace(written, actual)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DEQ_")}
    env["DEQ_TARGET"] = live[GRPC_ADDRESS]
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    try:
        done = subprocess.run(
            command_of(replace(block, code=code)),
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{block.where}: still running after {BLOCK_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise AssertionError(
            f"{block.where}: exit status {done.returncode}\n--- block ---\n{code}"
            f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
        )


def run_page(blocks: list[Block], folder: Path) -> list[Block]:
    """Run the blocks not marked `not run`, in order, in `folder`, against one fresh server;
    returns the blocks that ran."""
    runnable = [block for block in blocks if block.not_run is None]
    for block in runnable:
        command_of(block)  # every block is run or marked: fail before starting anything
    with running_server(model_dir=folder / "models") as server:
        assert server.metrics_port is not None
        for block in runnable:
            run_block(block, folder, server.port, server.metrics_port)
    return runnable


@pytest.mark.parametrize("page", RUN_PAGES)
def test_every_block_of_the_page_runs_against_a_live_server(page: str, tmp_path: Path) -> None:
    blocks = blocks_of((REPO / page).read_text(), page)
    ran = run_page(blocks, tmp_path)
    assert ran, f"{page}: no block ran"
    assert all(block.not_run for block in blocks if block not in ran)


def test_a_broken_example_fails(tmp_path: Path) -> None:
    """The runner is not a rubber stamp: a wrong model name in an otherwise good block fails."""
    good = blocks_of((REPO / "README.md").read_text(), "README.md")
    tour = next(b for b in good if b.language == "python" and '"digits"' in b.code)
    broken = replace(tour, code=tour.code.replace('"digits"', '"digitz"', 1))
    with pytest.raises(AssertionError, match="NOT_FOUND"):
        run_page([broken], tmp_path)


def test_blocks_must_be_run_or_marked_with_a_reason() -> None:
    page = "x\n\n```python\nprint(1)\n```\n"
    assert blocks_of(page, "p")[0] == Block("p:3", "python", "print(1)\n", None)
    marked = "<!-- not run: needs Docker -->\n```bash\ndocker compose up\n```\n"
    assert blocks_of(marked, "p")[0].not_run == "needs Docker"
    for bad in ("<!-- not run: -->", "<!-- not run:   \n -->", "<!-- skip -->"):
        with pytest.raises(ValueError, match="not run: reason"):
            blocks_of(f"{bad}\n```bash\ndocker compose up\n```\n", "p")
    with pytest.raises(ValueError, match="neither run"):
        command_of(blocks_of("```toml\n[x]\n```\n", "p")[0])


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    return {_anchor(h) for h in re.findall(r"^#{1,6} (.*)$", text, re.M)}


@pytest.mark.parametrize("page", DOC_PAGES)
def test_relative_links_lead_somewhere(page: str) -> None:
    path = REPO / page
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or (dest.suffix == ".md" and anchor not in {"", *_headings(dest)}):
            broken.append(target)
    assert broken == []

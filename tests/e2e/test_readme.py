"""Every code block of README.md runs as written (a newcomer copies them).

- ```bash blocks run line by line from the repository root, as a user's shell would: the
  project venv is not on PATH (`uv run` finds it), and the database goes to a temp dir. A
  line ending in ``# prints: X`` must print X as its last line.
- ```python blocks run with the project's Python in a temp dir; a ``# prints: X`` comment
  is checked against what they print.
- ```yaml blocks parse; those with ``agents`` are valid workflow files; a
  ``<!-- file: PATH -->`` marker before one says it is that file of the repository,
  verbatim (and the file loads).
- The ``<!-- synopsis: … -->`` block lists commands: each one and each option exists.

The exceptions are markers on the line before a block, each with its reason, kept rare:
``<!-- not-run: REASON -->`` skips the block (it starts a server that runs until stopped);
``<!-- not-run "PREFIX": REASON -->`` skips the lines starting with PREFIX;
``<!-- exit "N": REASON -->`` expects every line of the block to exit N (an error example).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from alpaca_engine.cli import app
from alpaca_engine.engine import Engine
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.workflows.loader import load_workflow, resolve_workflow
from alpaca_engine.workflows.schema import WorkflowSpec
from tests.helpers import PATIENCE

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*([\w-]+)(?:\s+\"([^\"]+)\")?:\s*(.+?)\s*-->$")
# Generous for a loaded 2-core machine: `uv run` may sync, the demo starts servers.
COMMAND_TIMEOUT = 2 * PATIENCE


@dataclass
class Block:
    lang: str
    line: int
    text: str
    markers: dict[str, tuple[str | None, str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def blocks() -> list[Block]:
    """Fenced blocks with the markers written on the lines right before them."""
    lines = README.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        markers: dict[str, tuple[str | None, str]] = {}
        j = i - 1
        while j >= 0 and (marker := _MARKER.match(lines[j].strip())):
            markers[marker.group(1)] = (marker.group(2), marker.group(3))
            j -= 1
        end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
        found.append(Block(match.group(1), i + 1, "\n".join(lines[i + 1:end]) + "\n", markers))
        i = end + 1
    return found


def of(lang: str) -> list[Block]:
    return [b for b in blocks() if b.lang == lang]


def shell_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell: no project venv on PATH, a throwaway database."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and p != venv_bin)
    env["ALPACA_DATABASE_URL"] = f"sqlite:///{tmp_path}/readme.db"
    return env


def test_the_readme_has_blocks_of_each_kind_and_few_exceptions() -> None:
    kinds = {b.lang for b in blocks()}
    assert {"bash", "python", "yaml"} <= kinds
    skipped = [b for b in blocks() if "not-run" in b.markers]
    assert len(skipped) <= 3, [b.name for b in skipped]
    for block in blocks():
        assert set(block.markers) <= {"not-run", "synopsis", "file", "exit"}, block.name
        assert all(reason for _, reason in block.markers.values()), block.name


def runnable(block: Block) -> bool:
    whole_skip = "not-run" in block.markers and block.markers["not-run"][0] is None
    return "synopsis" not in block.markers and not whole_skip


@pytest.mark.timeout(3 * COMMAND_TIMEOUT)
@pytest.mark.parametrize("block", [b for b in of("bash") if runnable(b)], ids=lambda b: b.name)
def test_bash_blocks_run_line_by_line(block: Block, tmp_path: Path) -> None:
    skip_prefix = block.markers.get("not-run", (None, ""))[0]
    expected = int(block.markers.get("exit", ("0", ""))[0] or 0)
    env = shell_env(tmp_path)
    ran = 0
    for line in block.text.splitlines():
        command = line.strip()
        if not command or command.startswith("#"):
            continue
        if skip_prefix and command.startswith(skip_prefix):
            continue
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == expected, (
            f"{block.name}: `{command}` exited {done.returncode}, not {expected}\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        if "# prints: " in command:
            want = command.rsplit("# prints: ", 1)[1].strip()
            assert done.stdout.splitlines()[-1:] == [want], (
                f"{block.name}: `{command}` printed {done.stdout[-3000:]!r}")
        ran += 1
    assert ran, f"{block.name}: nothing ran"


def test_not_run_blocks_are_the_documented_exceptions() -> None:
    whole = [b for b in of("bash") if b.markers.get("not-run", ("x", ""))[0] is None]
    assert whole and all(b.text.split()[:3] == ["uv", "run", "alpaca"] for b in whole)
    assert all(b.text.startswith("uv run alpaca serve") for b in whole)  # runs until stopped


@pytest.mark.parametrize("block", of("python"), ids=lambda b: b.name)
def test_python_blocks_run(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.text)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    expected = re.findall(r"# prints: (.+)$", block.text, flags=re.MULTILINE)
    assert expected, f"{block.name}: say what it prints with a `# prints: …` comment"
    assert done.stdout.splitlines() == [e.strip() for e in expected]


@pytest.mark.parametrize("block", of("yaml"), ids=lambda b: b.name)
def test_yaml_blocks_are_valid_workflow_files(block: Block) -> None:
    document = yaml.safe_load(block.text)
    if not (isinstance(document, dict) and "agents" in document):
        return  # some other YAML (it parsed)
    WorkflowSpec.model_validate(document)
    if "file" in block.markers:
        path = ROOT / block.markers["file"][1]
        assert path.read_text() == block.text, f"{block.name} differs from {path}"
        load_workflow(path)


def _synopsis_lines() -> list[str]:
    [block] = [b for b in of("bash") if "synopsis" in b.markers]
    return [line.split("#", 1)[0].strip() for line in block.text.splitlines() if line.strip()]


def test_the_command_synopsis_matches_the_help() -> None:
    runner = CliRunner()
    checked = 0
    for line in _synopsis_lines():
        words = shlex.split(line)
        assert words[0] == "alpaca", line
        path: list[str] = []
        for word in words[1:]:
            if not re.fullmatch(r"[a-z|]+", word):
                break
            path.append(word)
        options = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line))
        variants = [[*path[:-1], leaf] for leaf in path[-1].split("|")] if path else [path]
        for command in variants:
            result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
            assert result.exit_code == 0, f"`alpaca {' '.join(command)}` is not a command"
            for option in options:
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", result.output), (
                    f"`alpaca {' '.join(command)}` has no option {option}")
            checked += 1
    assert checked >= 18


async def test_the_documented_denial_is_what_the_engine_says(tmp_path: Path) -> None:
    [text] = [b for b in of("text") if "needs capabilities not granted" in b.text]
    store = SQLiteStore(f"sqlite:///{tmp_path}/hello.db")
    await store.open()
    try:
        wf = load_workflow(ROOT / "examples" / "hello" / "workflow.yaml")
        run = await Engine(store, resolve_workflow).run(wf, "boss", "Say hello")
        assert run.state == "succeeded"
        [child] = await store.list_runs(parent_id=run.id)
        denied = next(s for s in await store.list_steps(child.id) if s.error)
    finally:
        await store.close()
    assert denied.error is not None and denied.error["code"] == "permission_denied"
    assert " ".join(text.text.split()) == denied.error["message"]

"""Every `alpaca` command pays the package's import before it does anything: the heavy
libraries only some commands need (the OpenAI SDK, FastAPI, trafilatura) load when used,
which took `alpaca runs list` from ~3 s to ~1.2 s of CPU on the 2-core machine."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("openai", "fastapi", "trafilatura")


def loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=True)
    return set(done.stdout.split())


def test_the_cli_and_the_demo_workflow_load_without_the_heavy_libraries() -> None:
    modules = loaded_after("import alpaca_engine.cli\n"
                           "from alpaca_engine.workflows.loader import resolve_workflow\n"
                           "resolve_workflow('builtin:demo')")
    assert not modules & set(HEAVY), modules & set(HEAVY)


def test_they_load_when_a_command_needs_them() -> None:
    modules = loaded_after("from alpaca_engine.api import create_app\n"
                           "from alpaca_engine.toolkit import extract_readable\n"
                           "extract_readable('<html><body><p>hi</p></body></html>')\n"
                           "import os; os.environ['OPENAI_API_KEY'] = 'k'\n"
                           "from alpaca_engine.workflows.loader import load_workflow_text\n"
                           "load_workflow_text('version: 1\\nagents:\\n  - name: a\\n"
                           "    model: {provider: openai, model: gpt-4o-mini}\\n')")
    assert set(HEAVY) <= modules

"""Every third-party module the package imports is declared in pyproject.toml.

``pip install .`` installs only what is declared; a module that arrives by accident (through
another package's dependencies, or only in the uv lock) breaks a plain pip install. The CI
step in ``.ci/run`` checks the whole install; this test catches the common cause early.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "alpaca_engine"


def imported_top_level_modules() -> dict[str, str]:
    """Top-level module name → the first file importing it (absolute imports only)."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def declared_distributions() -> set[str]:
    """The declared dependencies, plus what their requested extras pull in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared: set[str] = set()
    for line in project["dependencies"]:
        req = Requirement(line)
        declared.add(canonicalize_name(req.name))
        for extra in req.extras:
            for sub in requires(req.name) or []:
                sub_req = Requirement(sub)
                if sub_req.marker is not None and sub_req.marker.evaluate({"extra": extra}):
                    declared.add(canonicalize_name(sub_req.name))
    return declared


def test_every_third_party_import_is_a_declared_dependency() -> None:
    declared = declared_distributions()
    providers = packages_distributions()
    undeclared: list[str] = []
    for module, where in sorted(imported_top_level_modules().items()):
        if module in sys.stdlib_module_names or module == "alpaca_engine":
            continue
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists, f"{where} imports {module!r}, which no installed distribution provides"
        if not dists & declared:
            undeclared.append(f"{module} ({where}) from {sorted(dists)}")
    assert not undeclared, "declare in pyproject.toml [project.dependencies]: " + ", ".join(
        undeclared
    )


def test_the_html_cleaner_that_trafilatura_needs_is_declared() -> None:
    # justext (under trafilatura) imports lxml.html.clean, which lxml no longer ships; pip
    # 23 ignores lxml's "html-clean" extra, so only a direct declaration installs it.
    assert "lxml-html-clean" in declared_distributions()

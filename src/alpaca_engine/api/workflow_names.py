"""Which workflow a name means over HTTP: a registered one of the caller's tenant, or one the
server serves read-only (``builtin:NAME``, ``file:STEM``, or the ref/alias it was started with).

Kept apart from the routes so ``POST /v1/runs`` and the ``/v1/workflows`` routes resolve
names the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import NotFound
from ..workflow import Workflow
from ..workflows.loader import BUILTIN_PREFIX
from ..workflows.registry import parse_name
from ..workflows.schema import WorkflowError
from .problems import ProblemError
from .state import ApiState, ServedWorkflows

FILE_PREFIX = "file:"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def served_names(served: ServedWorkflows) -> dict[str, Workflow]:
    """Each served workflow under a name that cannot clash with a registered one (those have
    no ``:``): ``builtin:demo`` as it is, a file as ``file:`` + its stem."""
    names: dict[str, Workflow] = {}
    for workflow in served.workflows:
        if workflow.ref.startswith(BUILTIN_PREFIX):
            base = workflow.ref
        else:
            base = FILE_PREFIX + (_UNSAFE.sub("-", Path(workflow.ref).stem) or "workflow")
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names[name] = workflow
    return names


async def run_workflow(st: ApiState, tenant: str, name: str | None) -> Workflow:
    """The workflow ``POST /v1/runs`` starts: registered (``NAME``, ``NAME@V``,
    ``registry:NAME@V``, pinned to a version) or served (default: the first served one)."""
    if name is None:
        return st.served.default
    if parse_name(name) is not None:
        try:
            return await st.engine.registry.resolve(tenant, name)
        except NotFound as exc:
            raise ProblemError(422, "unknown_workflow",
                               f"{exc} (GET /v1/workflows lists the workflows)") from None
        except WorkflowError as exc:
            raise ProblemError(422, "workflow_error",
                               f"workflow {name!r} does not load: {exc}") from None
    found = served_names(st.served).get(name)
    return found if found is not None else st.served.get(name)

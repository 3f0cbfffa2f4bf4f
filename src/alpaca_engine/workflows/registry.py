"""Registered workflows (DESIGN §11): validate, push, pin and load versions from the store.

A builder pushes the YAML or JSON of the §9 format; the registry validates it with the
loader (every error at once, under the rules of workflows/policy.py) and stores an immutable
version per tenant and name. A run names a workflow as ``name`` (the latest version) or
``name@V``; the run records the version it resolved as ``registry:NAME@V``, so a resume, a
retry on another worker, or a later turn uses exactly that version after newer ones are
pushed. The ref carries no tenant: it is always resolved within the run's own tenant.

Versions never change, so loaded workflows are cached by (tenant, name, version): a worker
builds each version once. Loading imports catalog tools and may connect to MCP servers, so
it runs in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import NotFound
from ..store.base import Store
from ..store.records import WorkflowRecord, workflow_not_found
from ..workflow import Workflow
from .loader import Diagnosis, WorkflowError, diagnose_workflow_text
from .policy import Catalog, RegistryRules

__all__ = [
    "REF_PREFIX",
    "WorkflowRegistry",
    "WorkflowRejected",
    "content_hash",
    "is_registry_ref",
    "parse_name",
    "registry_ref",
]

REF_PREFIX = "registry:"
_NAME_AT = re.compile(r"^([A-Za-z0-9_-]{1,64})(?:@([1-9][0-9]{0,8}))?$")


def registry_ref(name: str, version: int) -> str:
    return f"{REF_PREFIX}{name}@{version}"


def is_registry_ref(ref: str) -> bool:
    return ref.startswith(REF_PREFIX)


def parse_name(text: str) -> tuple[str, int | None] | None:
    """``name``, ``name@V`` or ``registry:name@V`` -> (name, version or None); None when
    ``text`` is not a registered workflow's name at all (a file, ``builtin:*``)."""
    match = _NAME_AT.fullmatch(text.removeprefix(REF_PREFIX))
    if match is None or (is_registry_ref(text) and match.group(2) is None):
        return None
    return match.group(1), int(match.group(2)) if match.group(2) else None


def names_same_request(ref: str, requested: str | None, resolved: str) -> bool:
    """Whether a run that recorded ``ref`` answers a request for ``requested`` (which resolves
    to ``resolved`` now): an unpinned ``NAME`` matches any version of it, so a client's retry
    with the same Idempotency-Key still finds its run after a newer version was pushed."""
    if ref == resolved:
        return True
    asked = parse_name(requested) if requested else None
    kept = parse_name(ref) if is_registry_ref(ref) else None
    return asked is not None and kept is not None and asked[1] is None and asked[0] == kept[0]


def content_hash(data: Any) -> str:
    """SHA-256 of the document's canonical JSON: comments and layout are not content."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class WorkflowRejected(Exception):
    """A pushed workflow did not validate; nothing was stored."""

    def __init__(self, diagnosis: Diagnosis) -> None:
        super().__init__(f"{len(diagnosis.errors)} error(s)")
        self.diagnosis = diagnosis


@dataclass
class WorkflowRegistry:
    """The registry of one store. ``catalog`` is what pushed workflows may name (the API
    builds it from the served workflows); loading a stored version does not need it."""

    store: Store
    catalog: Catalog = field(default_factory=Catalog)
    cache_size: int = 128
    clock: Callable[[], float] = time.time
    _cache: OrderedDict[tuple[str, str, int], Workflow] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- checking and pushing ------------------------------------------------------------------

    async def validate(self, text: str, *, source: str = "<pushed>") -> Diagnosis:
        """Every error and warning of ``text`` (YAML or JSON) under the registry's rules;
        nothing is stored. A valid document comes back with its workflow built."""
        rules = RegistryRules.from_env(self.catalog)
        return await asyncio.to_thread(diagnose_workflow_text, text, source=source,
                                       rules=rules)

    async def push(self, tenant: str, text: str, *, fmt: str = "yaml",
                   author: str = "") -> tuple[WorkflowRecord, bool, Diagnosis]:
        """Validate and store a new version; the same content as the latest version returns
        that version and ``False``. Raises WorkflowRejected (nothing stored)."""
        found = await self.validate(text)
        if found.errors or found.spec is None or found.spec.name is None:
            raise WorkflowRejected(found)
        record = WorkflowRecord(tenant=tenant, name=found.spec.name,
                                content_hash=content_hash(found.data), author=author,
                                created_at=self.clock(), format=fmt, source=text)
        stored, created = await self.store.put_workflow(record)
        return stored, created, found

    # -- resolving -----------------------------------------------------------------------------

    async def record(self, tenant: str, name: str) -> WorkflowRecord:
        """The version ``name`` means (``name``, ``name@V``, ``registry:name@V``)."""
        parsed = parse_name(name)
        if parsed is None:
            raise NotFound(f"{name!r} is not a registered workflow's name (NAME or NAME@VERSION)")
        return await self.store.get_workflow(tenant, parsed[0], parsed[1])

    async def resolve(self, tenant: str, name: str) -> Workflow:
        """The workflow ``name`` means within ``tenant``, pinned: its ``ref`` is
        ``registry:NAME@V``, which a run records (and threads keep) to use that very version
        from then on. The one function runs and threads call."""
        parsed = parse_name(name)
        if parsed is None:
            raise NotFound(f"{name!r} is not a registered workflow's name (NAME or NAME@VERSION)")
        base, version = parsed
        if version is not None:
            cached = self._cached((tenant, base, version))
            if cached is not None:
                return cached
        record = await self.store.get_workflow(tenant, base, version)
        return await self._load(record)

    async def _load(self, record: WorkflowRecord) -> Workflow:
        key = (record.tenant, record.name, record.version)
        cached = self._cached(key)
        if cached is not None:
            return cached
        ref = registry_ref(record.name, record.version)
        # No catalog check: the version passed it when pushed, and versions never change.
        found = await asyncio.to_thread(diagnose_workflow_text, record.source, source=ref,
                                        ref=ref, rules=RegistryRules.from_env())
        if found.errors or found.workflow is None:
            found.raise_first()
            raise WorkflowError(ref, None, "", "the stored version does not load")
        with self._lock:
            self._cache[key] = found.workflow
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return found.workflow

    def _cached(self, key: tuple[str, str, int]) -> Workflow | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    async def versions(self, tenant: str, name: str) -> list[WorkflowRecord]:
        """Every version of ``name``, newest first; NotFound when there is none."""
        found = await self.store.list_workflow_versions(tenant, name)
        if not found:
            raise NotFound(workflow_not_found(name))
        return found

"""Bearer API keys bound to a tenant and a role (DESIGN §9).

Keys are ``alp_`` + 32 random bytes (url-safe base64); only their SHA-256 is stored, so a
stolen database does not hand out working keys. With no key in the store the server runs in
local mode: one tenant ``local``, role ``admin``, and ``alpaca serve`` binds to loopback only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

from fastapi import Request

from ..store.base import Store
from ..store.records import ApiKeyRecord
from .problems import ProblemError

KEY_PREFIX = "alp_"
LOCAL_TENANT = "local"


class Role(StrEnum):
    USER = "user"
    SUPERVISOR = "supervisor"
    ADMIN = "admin"
    BUILDER = "builder"
    """A user who may also push workflows (DESIGN §11); not a supervisor, so whoever builds a
    workflow does not also approve what it does."""

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Role.USER: 0, Role.BUILDER: 0, Role.SUPERVISOR: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class Principal:
    """Who is calling: every store lookup is scoped to ``tenant``."""

    tenant: str
    role: Role
    key_id: str | None = None
    name: str = ""

    @property
    def label(self) -> str:
        """What decisions record as ``decided_by``: the key's name, else its id."""
        return self.name or self.key_id or self.tenant

    def allows(self, role: Role) -> bool:
        if role == Role.BUILDER:  # beside the ranks: only builders and admins push workflows
            return self.role in (Role.BUILDER, Role.ADMIN)
        return self.role.rank >= role.rank


LOCAL_PRINCIPAL = Principal(tenant=LOCAL_TENANT, role=Role.ADMIN, name="local")


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_api_key(store: Store, tenant: str, role: Role | str, name: str = "",
                         now: float | None = None) -> tuple[str, ApiKeyRecord]:
    """Store a new key's hash and return the key itself (the only time it exists)."""
    key = generate_key()
    record = ApiKeyRecord(id=f"key_{uuid.uuid4().hex[:12]}", tenant=tenant, role=str(Role(role)),
                          key_hash=hash_key(key), name=name,
                          created_at=time.time() if now is None else now)
    return key, await store.create_api_key(record)


class Authenticator:
    """Resolves the bearer key of a request to a :class:`Principal`.

    Local (open) mode is decided from the store; it is re-checked every few seconds so a key
    created while the server runs switches authentication on (never off again).
    """

    def __init__(self, store: Store, *, recheck_seconds: float = 2.0) -> None:
        self.store = store
        self.recheck_seconds = recheck_seconds
        self.enabled = False
        self._checked_at = -1e18

    async def refresh(self) -> bool:
        if not self.enabled:
            self.enabled = bool(await self.store.list_api_keys())
            self._checked_at = time.monotonic()
        return self.enabled

    async def authenticate(self, request: Request) -> Principal:
        if not self.enabled and time.monotonic() - self._checked_at >= self.recheck_seconds:
            await self.refresh()
        if not self.enabled:
            return LOCAL_PRINCIPAL
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        challenge = {"WWW-Authenticate": 'Bearer realm="alpaca"'}
        if scheme.lower() != "bearer" or not token:
            raise ProblemError(401, "unauthorized", "an API key is required: "
                               "send 'Authorization: Bearer alp_...'", headers=challenge)
        record = await self.store.get_api_key(hash_key(token))
        if record is None or not hmac.compare_digest(record.key_hash, hash_key(token)):
            raise ProblemError(401, "unauthorized", "the API key is not valid",
                               headers=challenge)
        try:
            role = Role(record.role)
        except ValueError:
            raise ProblemError(403, "forbidden", f"the key has an unknown role {record.role!r}"
                               ) from None
        return Principal(tenant=record.tenant, role=role, key_id=record.id, name=record.name)


def require(principal: Principal, role: Role) -> None:
    if not principal.allows(role):
        raise ProblemError(403, "forbidden",
                           f"this needs the {role} role; the key has {principal.role}")

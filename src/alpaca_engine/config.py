"""Configuration from the environment (``ALPACA_*``) and an optional ``alpaca.toml``.

Environment wins over the file so a deployment can override a checked-in default.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .faults import DEFAULT_CONNECT_TIMEOUT
from .store.ownership import DEFAULT_MAX_RUN_ATTEMPTS
from .telemetry.logging import register_environment_secrets, register_secret
from .tools.governance import TenantPolicy


class TenantSettings(BaseModel):
    """``[tenants.NAME]`` in alpaca.toml: limits that only ever narrow what agents may do."""

    deny_tools: list[str] = []
    capabilities: list[str] | None = None

    def policy(self) -> TenantPolicy:
        caps = frozenset(self.capabilities) if self.capabilities is not None else None
        return TenantPolicy(deny_tools=tuple(self.deny_tools), capabilities=caps)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALPACA_", toml_file="alpaca.toml",
                                      extra="ignore")

    database_url: str = "sqlite:///./alpaca.db"
    redis_url: str | None = None
    audit_key: SecretStr | None = None
    lease_seconds: float = 30.0
    max_run_attempts: int = Field(default=DEFAULT_MAX_RUN_ATTEMPTS, ge=1)
    """Crashed attempts (worker died, lease expired) after which a run fails ``crash_loop``."""
    worker_concurrency: int = 8
    poll_interval: float = 0.5
    connect_timeout: float = Field(default=DEFAULT_CONNECT_TIMEOUT, gt=0)
    """Seconds to wait for PostgreSQL, MongoDB or Redis before saying it is unreachable."""
    tenants: dict[str, TenantSettings] = {}
    """Per-tenant policies (env: ALPACA_TENANTS as JSON)."""

    def model_post_init(self, context: Any, /) -> None:
        """Every process (CLI, worker, server) builds its Settings first: from then on the
        values of secret-looking environment variables are masked wherever text is kept."""
        register_environment_secrets(os.environ)

    @field_validator("audit_key", mode="before")
    @classmethod
    def _strip_key(cls, value: object) -> object:
        """Keys copied from files often end with a newline; one key must mean one key
        wherever it is read (``load_audit_key`` strips too). Blank means no key."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            return value.strip() or None
        return value

    def tenant_policies(self) -> dict[str, TenantPolicy]:
        return {name: t.policy() for name, t in self.tenants.items()}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def audit_key_bytes(self) -> bytes | None:
        if not self.audit_key:
            return None
        value = self.audit_key.get_secret_value()
        register_secret(value)
        return value.encode()

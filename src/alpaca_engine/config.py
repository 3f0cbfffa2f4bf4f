"""Configuration from the environment (``ALPACA_*``) and an optional ``alpaca.toml``.

Environment wins over the file so a deployment can override a checked-in default.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .faults import DEFAULT_CONNECT_TIMEOUT
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

"""Configuration from the environment (``ALPACA_*``) and an optional ``alpaca.toml``.

Environment wins over the file so a deployment can override a checked-in default.
"""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALPACA_", toml_file="alpaca.toml",
                                      extra="ignore")

    database_url: str = "sqlite:///./alpaca.db"
    redis_url: str | None = None
    audit_key: SecretStr | None = None
    lease_seconds: float = 30.0
    worker_concurrency: int = 8
    poll_interval: float = 0.5

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
        return self.audit_key.get_secret_value().encode() if self.audit_key else None

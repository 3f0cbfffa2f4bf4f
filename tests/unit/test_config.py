"""Configuration: alpaca.toml, environment overrides, tenant policies, the audit key."""

from __future__ import annotations

from pathlib import Path

import pytest

from alpaca_engine.config import Settings
from alpaca_engine.telemetry.logging import redact_text


def test_toml_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alpaca.toml").write_text(
        'database_url = "sqlite:///from-toml.db"\nlease_seconds = 12\n\n'
        '[tenants.acme]\ndeny_tools = ["notify_*"]\ncapabilities = ["search:local"]\n')
    s = Settings()
    assert s.database_url == "sqlite:///from-toml.db" and s.lease_seconds == 12
    policy = s.tenant_policies()["acme"]
    assert policy.deny_tools == ("notify_*",)
    assert policy.capabilities == frozenset({"search:local"})
    monkeypatch.setenv("ALPACA_DATABASE_URL", "sqlite:///from-env.db")
    monkeypatch.setenv("ALPACA_TENANTS", '{"beta": {"capabilities": []}}')
    s = Settings()
    assert s.database_url == "sqlite:///from-env.db"
    assert s.tenant_policies()["beta"].capabilities == frozenset()


def test_audit_key_is_a_registered_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPACA_AUDIT_KEY", "audit-key-do-not-log-42")
    assert Settings().audit_key_bytes() == b"audit-key-do-not-log-42"
    assert "audit-key-do-not-log-42" not in redact_text("key=audit-key-do-not-log-42")
    assert "audit-key" not in repr(Settings())


def test_audit_key_is_stripped_like_load_audit_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key copied from a file with its newline is the same key everywhere it is read."""
    from alpaca_engine.telemetry.audit import load_audit_key

    for raw in ("k3y\n", "  k3y  ", "\tk3y\r\n"):
        monkeypatch.setenv("ALPACA_AUDIT_KEY", raw)
        assert Settings().audit_key_bytes() == load_audit_key() == b"k3y"
    for blank in ("", "  \n"):
        monkeypatch.setenv("ALPACA_AUDIT_KEY", blank)
        assert Settings().audit_key_bytes() is None and load_audit_key() is None


def test_max_run_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_run_attempts == 5
    monkeypatch.setenv("ALPACA_MAX_RUN_ATTEMPTS", "3")
    assert Settings().max_run_attempts == 3
    monkeypatch.setenv("ALPACA_MAX_RUN_ATTEMPTS", "0")
    with pytest.raises(ValueError, match="max_run_attempts"):
        Settings()

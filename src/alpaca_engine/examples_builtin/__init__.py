"""Workflows bundled with the engine (``builtin:NAME``), used by ``alpaca demo``."""

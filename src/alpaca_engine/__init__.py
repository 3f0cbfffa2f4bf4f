"""Alpaca Agent Engine."""

"""Run dbt inside a Python virtual environment built for it, never in dbtvenv's own process."""

from __future__ import annotations

__version__ = "0.1.0"

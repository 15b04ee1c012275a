"""Run-time settings that are not part of the env spec."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from dbtvenv.errors import UsageError
from dbtvenv.options import DEFAULT_LOCK_TIMEOUT

DEFAULT_KILL_GRACE = 30.0
DEFAULT_LOCK_LEASE = 60.0


def env_seconds(name: str, default: float, *, minimum: float = 0.0) -> float:
    """A duration in seconds from an environment variable; a bad value is a usage error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum:
        raise UsageError(
            f"{name}={raw!r} is not a number of seconds >= {minimum:g}; "
            f"set it to one, such as {default:g}, or unset it for that default"
        )
    return value


def lock_lease() -> float:
    """DBTVENV_LOCK_LEASE: how long another host's lock stays fresh without a refresh."""
    return env_seconds("DBTVENV_LOCK_LEASE", DEFAULT_LOCK_LEASE, minimum=1.0)


class Settings(NamedTuple):
    installer: str = "pip"
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    lock_lease: float = DEFAULT_LOCK_LEASE
    kill_grace: float = DEFAULT_KILL_GRACE

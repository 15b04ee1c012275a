"""Run-time settings that are not part of the env spec."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from dbtvenv.errors import UsageError
from dbtvenv.options import DEFAULT_LOCK_TIMEOUT

DEFAULT_KILL_GRACE = 30.0
DEFAULT_LOCK_LEASE = 60.0
# The documented ranges (README, "Numbers"): outside them a value is a usage error.
KILL_GRACE_RANGE = (0.0, 3600.0)
LOCK_LEASE_RANGE = (1.0, 3600.0)  # as lock.MIN_LEASE, lock.MAX_LEASE


def env_seconds(name: str, default: float, *, minimum: float, maximum: float = math.inf) -> float:
    """A duration in seconds from an environment variable; a bad value is a usage error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except (ValueError, OverflowError):
        value = math.nan
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise UsageError(
            f"{name}={raw!r} is not a number of seconds >= {minimum:g}"
            + (f" and <= {maximum:g}; " if math.isfinite(maximum) else "; ")
            + f"set it to one, such as {default:g}, or unset it for that default"
        )
    return value


def lock_lease() -> float:
    """DBTVENV_LOCK_LEASE: how long another host's lock may stay unchanged before it is stale."""
    low, high = LOCK_LEASE_RANGE
    return env_seconds("DBTVENV_LOCK_LEASE", DEFAULT_LOCK_LEASE, minimum=low, maximum=high)


def kill_grace() -> float:
    """DBTVENV_KILL_GRACE: how long dbt may take to stop after a signal."""
    low, high = KILL_GRACE_RANGE
    return env_seconds("DBTVENV_KILL_GRACE", DEFAULT_KILL_GRACE, minimum=low, maximum=high)


class Settings(NamedTuple):
    installer: str = "pip"
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    lock_lease: float = DEFAULT_LOCK_LEASE
    kill_grace: float = DEFAULT_KILL_GRACE

"""Hide credentials inside URLs wherever dbtvenv writes text."""

from __future__ import annotations

import re
from collections.abc import Iterable

# The user-info part of any URL: scheme://user[:password]@host
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")


def redact(text: str) -> str:
    """`https://user:token@host/simple` -> `https://***@host/simple`."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


def redact_all(items: Iterable[str]) -> list[str]:
    return [redact(item) for item in items]

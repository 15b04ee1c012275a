"""Hide credentials inside URLs wherever dbtvenv writes text."""

from __future__ import annotations

import re
from collections.abc import Iterable

# The user-info part of any URL: scheme://user[:password]@host. It runs to the last `@` before
# the path, so a password with an unescaped `@` in it is hidden whole.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s'\"]+@")
# pip's `--proxy [user:passwd@]proxy.server:port` takes credentials without a scheme as well.
_PROXY_USERINFO = re.compile(
    r"(?P<option>--proxy(?:=|\s+)['\"]?)(?![A-Za-z][A-Za-z0-9+.-]*://)[^/\s'\"]+@"
)
_SCHEMELESS_USERINFO = re.compile(r"^(?![A-Za-z][A-Za-z0-9+.-]*://)[^/\s'\"]+@")


def redact(text: str) -> str:
    """`https://user:token@host/simple` -> `https://***@host/simple`."""
    text = _PROXY_USERINFO.sub(r"\g<option>***@", text)
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


def redact_all(items: Iterable[str]) -> list[str]:
    """Redact each item of an argument list; the value after a lone `--proxy` too."""
    out: list[str] = []
    after_proxy = False
    for item in items:
        shown = redact(item)
        if after_proxy:
            shown = _SCHEMELESS_USERINFO.sub("***@", shown)
        out.append(shown)
        after_proxy = item == "--proxy"
    return out

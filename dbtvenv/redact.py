"""Hide credentials inside URLs wherever dbtvenv writes text.

A URL's userinfo (`scheme://user:password@host`) may hold any character RFC 3986 allows there:
letters, digits, `-._~`, `!$&'()*+,;=`, `:` and `%XX` escapes; a password with an unescaped
`@` is hidden whole too (up to the last `@` before the host). One pass over the text, no
regular expression that could backtrack: the time is linear in the text's length.
"""

from __future__ import annotations

from collections.abc import Iterable
from string import ascii_letters, digits

HIDDEN = "***"
# What ends a URL's authority (RFC 3986: `/`, `?`, `#`), or can never be part of one
# unescaped (whitespace, `"<>\^`{|}`): a userinfo runs at most to the first of these.
_AUTHORITY_END = frozenset('/?#"<>\\^`{|} \t\r\n\f\v')
_SCHEME = frozenset(ascii_letters + digits + "+.-")
_LETTERS = frozenset(ascii_letters)
# pip's `--proxy [user:passwd@]proxy.server:port` takes credentials without a scheme.
_PROXY = "--proxy"


def redact(text: str) -> str:
    """`https://user:token@host/simple` -> `https://***@host/simple`."""
    return _redact_proxies(_redact_urls(text))


def _redact_urls(text: str) -> str:
    out: list[str] = []
    kept = 0  # text[:kept] is in `out` already
    searched = 0
    while True:
        sep = text.find("://", searched)
        if sep < 0:
            break
        start = sep + 3
        at, _ = _userinfo(text, start)
        if at is not None and _has_scheme(text, sep, kept):
            out += [text[kept:start], HIDDEN]
            kept = at
        # The next `://` may begin right at this authority's end (its `/`): search from here.
        # Still linear: an authority never runs past a `/`, so no two scans overlap.
        searched = start
    out.append(text[kept:])
    return "".join(out)


def _has_scheme(text: str, sep: int, floor: int) -> bool:
    """Whether `scheme` (a letter, then letters, digits, `+.-`) ends right before `sep`."""
    first = sep
    while first > floor and text[first - 1] in _SCHEME:
        first -= 1
    return any(c in _LETTERS for c in text[first:sep])


def _userinfo(text: str, start: int) -> tuple[int | None, int]:
    """The last `@` of the authority that begins at `start` (None if it has none), and the
    authority's end."""
    end = start
    length = len(text)
    while end < length and text[end] not in _AUTHORITY_END:
        end += 1
    at = text.rfind("@", start, end)
    return (at if at >= 0 else None), end


def _redact_proxies(text: str) -> str:
    out: list[str] = []
    kept = 0
    searched = 0
    while True:
        found = text.find(_PROXY, searched)
        if found < 0:
            break
        value = found + len(_PROXY)
        if value < len(text) and text[value] == "=":
            value += 1
        else:
            while value < len(text) and text[value].isspace():
                value += 1
        if value < len(text) and text[value] in "'\"":
            value += 1
        searched = value if value > found + len(_PROXY) else found + len(_PROXY)
        if value == found + len(_PROXY):
            continue  # `--proxy` glued to something else: no value of its own
        at, end = _userinfo(text, value)
        if at is not None and "://" not in text[value:end]:
            out += [text[kept:value], HIDDEN]
            kept = at
        searched = max(end, searched)
    out.append(text[kept:])
    return "".join(out)


def redact_all(items: Iterable[str]) -> list[str]:
    """Redact each item of an argument list; the value after a lone `--proxy` too."""
    out: list[str] = []
    after_proxy = False
    for item in items:
        shown = redact(item)
        if after_proxy and "://" not in item:
            at, _ = _userinfo(shown, 0)
            if at is not None:
                shown = HIDDEN + shown[at:]
        out.append(shown)
        after_proxy = item == _PROXY
    return out

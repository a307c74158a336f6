"""Storage URIs as they may be shown: passwords never leave the process in a message.

``redis://:hunter2@host/0`` is shown as ``redis://:***@host/0``, ``redis://user:pw@host``
as ``redis://user:***@host``, and secret query parameters (``?password=...``) are masked
too. Every place that puts a URI in an exception, an event, a repr or command output goes
through :func:`redact_uri`; :func:`scrub` also masks the URI's secrets wherever they appear
in a message (a backend's own error text, say).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"
_LOCAL_SCHEMES = ("file", "local", "disk")
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*\Z")


def uri_like(text: str) -> bool:
    """Whether ``text`` reads as a URI rather than a folder path: a ``:`` comes before any
    ``/`` or ``@`` (``redis:/:pw@host/0``, a typo for ``redis://``, does; ``/a:b`` does not)."""
    colon = text.find(":")
    if colon < 0:
        return False
    stops = [i for i in (text.find("/"), text.find("@")) if i >= 0]
    return not stops or colon < min(stops)


def malformed_uri(text: str) -> bool:
    """Whether ``text`` reads as a URI (:func:`uri_like`) but lacks a valid ``scheme://``."""
    scheme, sep, _ = text.partition("://")
    return not (sep and _SCHEME.match(scheme)) and uri_like(text)


def _split(uri: str) -> tuple[str, str, str, str, str] | None:
    """(scheme, separator, userinfo, rest of the authority and path, query and fragment), or
    None for a URI that cannot carry credentials (a folder path, ``file://``). A malformed
    URI (``redis:/:pw@host``) is split at its first ``:`` and the slashes after it."""
    scheme, sep, rest = uri.partition("://")
    if not (sep and _SCHEME.match(scheme)):
        if not uri_like(uri):
            return None
        scheme, _, after = uri.partition(":")
        rest = after.lstrip("/")
        sep = uri[len(scheme) : len(uri) - len(rest)]
    if scheme.lower() in _LOCAL_SCHEMES:
        return None
    end = len(rest)
    for mark in "?#":
        found = rest.find(mark)
        if found >= 0:
            end = min(end, found)
    head, tail = rest[:end], rest[end:]
    at = head.rfind("@")  # a raw '@' in a password still leaves the host after the last one
    if at < 0:
        return scheme, sep, "", head, tail
    return scheme, sep, head[:at], head[at + 1 :], tail


def _query_secrets(tail: str) -> list[str]:
    query = tail[1:].split("#", 1)[0] if tail.startswith("?") else ""
    found = []
    for pair in query.split("&"):
        name, sep, value = pair.partition("=")
        if sep and value and _SECRET_PARAM.search(name):
            found.append(value)
    return found


def redact_uri(uri: object) -> str:
    """``uri`` with its password (or whole userinfo) and secret query values masked."""
    text = str(uri)
    parts = _split(text)
    if parts is None:
        return text
    scheme, separator, userinfo, host, tail = parts
    if userinfo:
        user, colon, _ = userinfo.partition(":")
        userinfo = f"{user}:{MASK}@" if colon else f"{MASK}@"
    if tail.startswith("?"):
        query, hash_mark, fragment = tail[1:].partition("#")
        pairs = []
        for pair in query.split("&"):
            name, sep, value = pair.partition("=")
            if sep and value and _SECRET_PARAM.search(name):
                pair = f"{name}={MASK}"
            pairs.append(pair)
        tail = "?" + "&".join(pairs) + hash_mark + fragment
    return f"{scheme}{separator}{userinfo}{host}{tail}"


def secrets_of(uri: object) -> list[str]:
    """The secret parts of ``uri`` (as written and percent-decoded), longest first."""
    parts = _split(str(uri))
    if parts is None:
        return []
    _, _, userinfo, _, tail = parts
    raw = []
    if userinfo:
        user, colon, password = userinfo.partition(":")
        raw.append(password if colon else user)
    raw += _query_secrets(tail)
    found = {s for value in raw for s in (value, unquote(value)) if len(s) >= 3}
    return sorted(found, key=len, reverse=True)


def scrub(text: str, uri: object) -> str:
    """``text`` with ``uri`` shown redacted and its secrets masked wherever they appear."""
    if uri is None:
        return text
    plain = str(uri)
    if plain and plain in text:
        text = text.replace(plain, redact_uri(plain))
    for secret in secrets_of(plain):
        text = text.replace(secret, MASK)
    return text

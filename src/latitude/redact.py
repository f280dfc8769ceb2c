"""Database URLs fit to print: the password hidden, user, host, port and database kept."""

from __future__ import annotations

import re
from typing import overload

__all__ = ["redact_url"]

HIDDEN = "***"

# libpq's keyword form (`host=db password='it''s' user=app`) and a URL's query parameter.
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.|'')*'|\S*)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"((?:^|&)password=)[^&]*", re.IGNORECASE)


@overload
def redact_url(url: str) -> str: ...
@overload
def redact_url(url: None) -> None: ...
def redact_url(url: str | None) -> str | None:
    """``postgresql://app:s3cret@db:5432/app`` -> ``postgresql://app:***@db:5432/app``.

    The password may contain ``@``, ``:`` or ``/`` unencoded (the last ``@`` before the query
    ends it); a ``password=`` query parameter or libpq keyword is hidden too. A URL without a
    password comes back unchanged, ``None`` as ``None``.
    """
    if not url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _KEYWORD_PASSWORD.sub(rf"\g<1>{HIDDEN}", url)
    main, q, query = rest.partition("?")
    creds, at, host = main.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":" + HIDDEN
    query = _QUERY_PASSWORD.sub(rf"\g<1>{HIDDEN}", query)
    return f"{scheme}://{creds}{at}{host}{q}{query}"

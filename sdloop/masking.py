"""Secrets out of what is printed: passwords in URLs become ``***`` in every message, log line and table.

Why a module of the shared layer: a store URL (``SDLOOP_STORE_URL=postgresql+psycopg://sdloop:PASS@db/sdloop``)
reaches the command line, the service's log and error messages from several packages; each of them masks it with
the same function instead of trusting its own string formatting. Masking errs on the side of hiding: a URL that
cannot be parsed loses everything between ``://`` and its last ``@``.
"""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import unquote

MASK = "***"
# query parameters that carry a secret (libpq's password=, sslpassword=, a token=...)
_SECRET_PARAM = re.compile(r"(?i)([?&;](?:password|passwd|pwd|sslpassword|secret|token|api_key|apikey)=)([^&;#]*)")


def url_password(url: str) -> Optional[str]:
    """The password written in ``url``'s user info (as written, and None when there is none)."""
    head, sep, rest = url.partition("://")
    if not sep:  # not a URL: what mask_url hides, from the first ':' to the last '@'
        at = url.rfind("@")
        return url[url.index(":") + 1:at] or None if at > 0 and ":" in url[:at] else None
    if rest.startswith("/"):
        return None
    end = rest.find("?")
    at = rest.rfind("@", 0, end if end >= 0 else len(rest))
    if at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    return password if colon and password else None


def mask_url(url: Optional[str]) -> str:
    """``url`` with its password (user info or a password-like query parameter) replaced by ``***``.

    ``postgresql+psycopg://sdloop:s3cret@db:5432/sdloop`` -> ``postgresql+psycopg://sdloop:***@db:5432/sdloop``;
    a URL without a password (``sqlite:///...``) comes back unchanged; None gives "".
    """
    if not url:
        return ""
    text = str(url)
    head, sep, rest = text.partition("://")
    if sep and not rest.startswith("/"):
        end = rest.find("?")
        at = rest.rfind("@", 0, end if end >= 0 else len(rest))
        if at >= 0:
            user, colon, password = rest[:at].partition(":")
            if colon and password:
                text = f"{head}://{user}:{MASK}@{rest[at + 1:]}"
    elif not sep and "@" in text and ":" in text[:text.rfind("@")]:  # not a URL: hide from the first ':' to the '@'
        at = text.rfind("@")
        text = f"{text[:text.index(':')]}:{MASK}{text[at:]}"
    return _SECRET_PARAM.sub(lambda m: m.group(1) + MASK, text)


def mask_text(text: str, *urls: Optional[str]) -> str:
    """``text`` (an error message, a log line) with every URL of ``urls`` masked and their passwords, raw or
    percent-decoded, replaced wherever they appear (a driver may quote the password alone)."""
    out = str(text)
    for url in urls:
        if not url:
            continue
        out = out.replace(str(url), mask_url(url))
        secrets = {m.group(2) for m in _SECRET_PARAM.finditer(str(url))}
        password = url_password(str(url))
        if password:
            secrets |= {password, unquote(password)}
        for secret in sorted((s for s in secrets if len(s) >= 3), key=len, reverse=True):
            out = out.replace(secret, MASK)
    return out

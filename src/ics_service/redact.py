"""URLs as they may be shown: subscription URLs with passwords, query values and tokens
hidden; source URIs with their credentials (user information, presigned queries) hidden.

The channels ICS implements itself (webhooks, files, SNS) keep their host and path but
their password, query values and token-like path segments. Any other scheme is an apprise
URL, whose plugins put tokens anywhere (`tgram://BOT_TOKEN/CHAT`, `slack://A/B/C`,
`pover://USER@TOKEN`): there every user, password, path segment and host that is not a
dotted host name is hidden. A built apprise channel shows apprise's own masked URL instead.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import parse_qsl, quote, unquote_plus, urlencode, urlsplit, urlunsplit

#: Query parameters that are a subscription's options, shown as they are.
PLAIN_PARAMS = ("ics-kinds", "ics-mode", "ics-rate")
#: Schemes whose URLs keep their tokens only in the password, the query or a long path
#: segment.
OWN_SCHEMES = ("http", "https", "file", "sns")
#: A path segment this long made of token characters is taken for a secret (chat webhooks
#: carry their tokens in the path).
_TOKEN = re.compile(r"^[A-Za-z0-9_\-]{16,}$")
#: A host name worth showing: dotted labels, at least one of them with a letter.
_HOST = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_MASK = "***"


def _own_netloc(netloc: str) -> str:
    if "@" not in netloc:
        return netloc
    user, _, host = netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return f"{name}:{_MASK}@{host}" if ":" in user else f"{_MASK}@{host}"


def _apprise_netloc(netloc: str) -> str:
    user, at, host = netloc.rpartition("@")
    shown_user = ":".join(_MASK for _ in user.split(":")) + at if at else ""
    name, colon, port = host.partition(":")
    if not _HOST.match(name):
        return shown_user + _MASK
    return shown_user + name + (colon + port if port.isdigit() else colon + _MASK if colon else "")


def hide_secrets(url: str) -> str:
    """The URL with its secrets (see the module) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _MASK
    if parts.scheme.lower() in OWN_SCHEMES:
        netloc = _own_netloc(parts.netloc)
        segments = [_MASK if _TOKEN.match(seg) else seg for seg in parts.path.split("/")]
    else:
        netloc = _apprise_netloc(parts.netloc)
        segments = [_MASK if seg else seg for seg in parts.path.split("/")]
    query = urlencode(
        [(k, v if k in PLAIN_PARAMS else _MASK) for k, v in parse_qsl(parts.query, True)],
        safe="*,/",
    )
    return urlunsplit((parts.scheme, netloc, quote("/".join(segments), safe="/*:@"), query, ""))


# --- source URIs ------------------------------------------------------------------------

#: Names (lower case) whose values are credentials though no part of them says so: the
#: signatures of Azure SAS (`sig`), CloudFront and S3 V2 (`policy`), OAuth codes.
SECRET_NAMES = frozenset({"sig", "code", "policy"})
#: Parts of names whose values are credentials: x-amz-signature, x-amz-credential,
#: x-amz-security-token, googleaccessid's key, access_token, api_key, apikey, access_key,
#: key-pair-id, account_key, sas_token, connection_string, password, sslpassword, auth...
SECRET_PARTS = (
    "signature",
    "credential",
    "token",
    "secret",
    "password",
    "passwd",
    "key",
    "auth",
    "sas",
    "connection_string",
    "googleaccessid",
)


def secret_name(name: str) -> bool:
    """Whether a query parameter or option of this name holds a credential: the one rule
    for source URIs, the store URL and storage options alike."""
    lowered = name.lower()
    return lowered in SECRET_NAMES or any(part in lowered for part in SECRET_PARTS)


#: How a hidden value is stored: *** and a digest that keeps two URIs two (see `redact_uri`).
_HIDDEN = re.compile(r"\*\*\*~[0-9a-f]{8}")


def _hidden(value: str) -> bool:
    return _HIDDEN.fullmatch(value) is not None


def redact_uri(uri: str) -> str:
    """A source URI as records, logs and answers may hold it: the password of its user
    information (or a lone user name, often a token) and the values of credential query
    parameters (`secret_name`) replaced by `***~D`, where D is 8 hex digits of the SHA-256
    of the whole URI. Everything else is kept exactly as written, so two URIs that differ
    only in a secret stay two items. A URI with no such part, or already redacted, comes
    back as it is."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() == "file" or ("@" not in rest and "?" not in rest):
        return uri
    # The digest is of the whole URI, not of the secret alone: a presigned URL's signature
    # makes it unguessable, where a hash of a short password could be brute-forced offline.
    # A URI whose only secret is a weak password still lets a reader of the records test
    # guesses of it; 8 digits (32 bits) are enough to keep a listing's items apart.
    mask = f"{_MASK}~{hashlib.sha256(uri.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    authority_end = min(
        (i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest)
    )
    authority, tail = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        user, _, host = authority.rpartition("@")
        name, colon, password = user.partition(":")
        if colon:
            authority = f"{name}:{password if _hidden(password) else mask}@{host}"
        elif not _hidden(user):
            authority = f"{mask}@{host}"
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        pairs = []
        for pair in query.split("&"):
            name, eq, value = pair.partition("=")
            hide = eq and secret_name(unquote_plus(name)) and not _hidden(value)
            pairs.append(f"{name}={mask}" if hide else pair)
        path = f"{path}?{'&'.join(pairs)}{hash_}{fragment}"
    return f"{scheme}{sep}{authority}{path}"


def is_redacted(uri: str) -> bool:
    """Whether a URI had a credential replaced by `redact_uri` (so it cannot be read as it is)."""
    return _HIDDEN.search(uri) is not None and redact_uri(uri) == uri

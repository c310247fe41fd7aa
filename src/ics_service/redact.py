"""URLs as they may be shown: subscription URLs with passwords, query values and tokens
hidden; source URIs with their credentials (user information, presigned queries) hidden.

The channels ICS implements itself (webhooks, files, SNS) keep their host and path but
their password, query values and token-like path segments. Any other scheme is an apprise
URL, whose plugins put tokens anywhere (`tgram://BOT_TOKEN/CHAT`, `slack://A/B/C`,
`pover://USER@TOKEN`): there every user, password, path segment and host that is not a
dotted host name is hidden. A built apprise channel shows apprise's own masked URL instead.
"""

from __future__ import annotations

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

#: Query parameters whose values are credentials, by exact name (lower case): presigned
#: URLs of S3 (SigV4 and V2), Google Cloud Storage, Azure (SAS `sig`) and CloudFront, and
#: API keys.
SECRET_PARAMS = frozenset(
    {
        "sig",
        "key",
        "apikey",
        "api_key",
        "awsaccesskeyid",
        "googleaccessid",
        "policy",
        "key-pair-id",
        "code",
    }
)
#: Parts of query parameter names whose values are credentials (x-amz-signature,
#: x-amz-credential, x-amz-security-token, x-goog-signature, access_token, password...).
SECRET_PARTS = ("signature", "credential", "token", "secret", "password", "passwd")


def _secret_param(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_PARAMS or any(part in lowered for part in SECRET_PARTS)


def redact_uri(uri: str) -> str:
    """A source URI as records, logs and answers may hold it: the password of its user
    information (or a lone user name, often a token) and the values of credential query
    parameters (`SECRET_PARAMS`, `SECRET_PARTS`) replaced by ***. Everything else is kept
    exactly as written, so two items stay two. A URI with no such part comes back as it is."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() == "file" or ("@" not in rest and "?" not in rest):
        return uri
    authority_end = min(
        (i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest)
    )
    authority, tail = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        user, _, host = authority.rpartition("@")
        name, colon, _ = user.partition(":")
        authority = f"{name}:{_MASK}@{host}" if colon else f"{_MASK}@{host}"
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        pairs = []
        for pair in query.split("&"):
            name, eq, _ = pair.partition("=")
            pairs.append(f"{name}={_MASK}" if eq and _secret_param(unquote_plus(name)) else pair)
        path = f"{path}?{'&'.join(pairs)}{hash_}{fragment}"
    return f"{scheme}{sep}{authority}{path}"


def is_redacted(uri: str) -> bool:
    """Whether a URI had a credential replaced by `redact_uri` (so it cannot be read as it is)."""
    return _MASK in uri and redact_uri(uri) == uri and (f"{_MASK}@" in uri or f"={_MASK}" in uri)

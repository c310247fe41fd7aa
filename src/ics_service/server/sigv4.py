"""AWS Signature Version 4, checked on the server: boto3's `sagemaker-runtime` client signs
its requests and cannot send a bearer token, so with an API token configured the SageMaker
paths also accept a signature by the access key configured for ICS.

The canonical request is rebuilt from what arrived (method, path as sent, query, the headers
the Authorization header names, the body's SHA-256) and signed again with the secret; the
signature must match (compared in constant time), the credential scope must be for
`sagemaker` (and for `region`, when one is given), and X-Amz-Date within 15 minutes of now.
Only POST to `/invocations`, `/endpoints/{name}/invocations`,
`/endpoints/{name}/invocations-response-stream`, `/endpoints/{name}/async-invocations` or `/`
(the SageMaker API's DescribeEndpoint and DescribeEndpointConfig) is accepted this way.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from ..config import Settings
from ..errors import ConfigError
from .guards import Scope
from .sagemaker_wire import INVOCATION_PATHS

ALGORITHM = "AWS4-HMAC-SHA256"
#: The signing name boto3's `sagemaker-runtime` client uses.
SERVICE = "sagemaker"
#: How far X-Amz-Date may be from the server's clock, either way (as AWS allows).
MAX_SKEW = dt.timedelta(minutes=15)
#: The only requests a signature may authorise: the SageMaker container and runtime paths,
#: and the SageMaker API's `/` (DescribeEndpoint...).
SIGNED_PATHS = re.compile(rf"/|{INVOCATION_PATHS.pattern}")

_AUTH = re.compile(
    r"AWS4-HMAC-SHA256\s+"
    r"Credential=(?P<credential>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+)\s*,\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})\s*"
)
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

#: What `Verifier._head` finds in the headers: the headers by name, X-Amz-Date, the
#: credential scope's day, region and service, the signed header names and the signature.
_Head = tuple[dict[str, list[str]], str, str, str, str, list[str], str]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Verifier:
    """A `guards.SigV4Verifier`: whether a request is validly signed by `access_key_id`;
    `precheck` rules out, before the body is read, what the headers alone can rule out."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    #: The region the credential scope must name; None: any region.
    region: str | None = None
    clock: Callable[[], dt.datetime] = _utcnow

    def precheck(self, scope: Scope) -> bool:
        """Whether the request can be validly signed, from what arrives before its body: the
        method and path, the Authorization header's form, access key, credential scope and
        signed headers, and X-Amz-Date. A request that fails here is refused unread."""
        return self._head(scope) is not None

    def signed_payload_hash(self, scope: Scope) -> str | None:
        """The body's SHA-256 (hex) when the signature covers one the client declared
        (X-Amz-Content-SHA256, a signed header): the signature can then be checked from the
        headers alone (`verify_head`), and the body against that hash as it arrives."""
        head = self._head(scope)
        if head is None or "x-amz-content-sha256" not in head[5]:
            return None
        claimed = _one(head[0], "x-amz-content-sha256")
        return claimed if claimed is not None and _SHA256_HEX.fullmatch(claimed) else None

    def verify_head(self, scope: Scope, payload_hash: str) -> bool:
        """Whether the request is validly signed, were its body's SHA-256 `payload_hash`."""
        head = self._head(scope)
        return head is not None and self._valid(scope, head, payload_hash)

    def __call__(self, scope: Scope, body: bytes) -> bool:
        head = self._head(scope)
        if head is None:
            return False
        payload_hash = hashlib.sha256(body).hexdigest()
        claimed = _one(head[0], "x-amz-content-sha256")
        # A claimed hash (UNSIGNED-PAYLOAD included) must be the body's: the body is signed.
        if claimed is not None and claimed != payload_hash:
            return False
        return self._valid(scope, head, payload_hash)

    def _valid(self, scope: Scope, head: _Head, payload_hash: str) -> bool:
        headers, amz_date, day, region, service, signed, signature = head
        try:
            canonical = canonical_request(scope, headers, signed, payload_hash)
        except KeyError:
            return False
        credential_scope = f"{day}/{region}/{service}/aws4_request"
        to_sign = "\n".join(
            [
                ALGORITHM,
                amz_date,
                credential_scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        key = signing_key(self.secret_access_key, day, region, service)
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected.encode(), signature.encode())

    def _head(self, scope: Scope) -> _Head | None:
        """The parts of the signature that the headers carry, or None if they rule it out."""
        if scope.get("method") != "POST" or not SIGNED_PATHS.fullmatch(scope.get("path", "")):
            return None
        headers = _headers(scope)
        match = _AUTH.fullmatch(",".join(headers.get("authorization", [])))
        if match is None:
            return None
        credential = _split_credential(match["credential"])
        if credential is None:
            return None
        key_id, day, region, service = credential
        # Checked in constant time, as the signature is: neither says how close a guess was.
        known_key = hmac.compare_digest(key_id.encode(), self.access_key_id.encode())
        if not known_key or service != SERVICE:
            return None
        if self.region is not None and region != self.region:
            return None
        amz_date = _one(headers, "x-amz-date")
        if amz_date is None or not self._fresh(amz_date) or amz_date[:8] != day:
            return None
        signed = match["signed"].split(";")
        if signed != sorted(set(signed)) or not {"host", "x-amz-date"} <= set(signed):
            return None
        if not set(signed) <= headers.keys():
            return None
        return headers, amz_date, day, region, service, signed, match["signature"]

    def _fresh(self, amz_date: str) -> bool:
        try:
            signed_at = dt.datetime.strptime(amz_date, _AMZ_DATE).replace(tzinfo=dt.UTC)
        except ValueError:
            return False
        return abs(self.clock() - signed_at) <= MAX_SKEW


def verifier_of(settings: Settings, *, region: str | None = None) -> Verifier | None:
    """The SigV4 verifier of the configured access key, or None when none is configured."""
    key_id, secret = settings.sigv4_access_key_id, settings.sigv4_secret_access_key
    if not key_id and not secret:
        return None
    if not key_id or not secret:
        missing = "sigv4_secret_access_key" if key_id else "sigv4_access_key_id"
        raise ConfigError(
            f"{missing} is not set: SigV4 needs both sigv4_access_key_id and "
            "sigv4_secret_access_key (ICS_SIGV4_ACCESS_KEY_ID, ICS_SIGV4_SECRET_ACCESS_KEY)"
        )
    return Verifier(key_id, secret, region=region)


def canonical_request(
    scope: Scope, headers: dict[str, list[str]], signed: list[str], payload_hash: str
) -> str:
    """The SigV4 canonical request of an ASGI request (a KeyError for a signed header that
    did not arrive)."""
    raw_path = scope.get("raw_path")
    if raw_path is not None:
        # The path as sent; some servers leave the query on it.
        path = bytes(raw_path).split(b"?", 1)[0].decode("latin-1")
    else:
        path = quote(scope["path"], safe="/~!$&'()*+,;=:@%")
    lines = [
        scope["method"].upper(),
        # Encoded once more, as every service but S3 expects.
        quote(_remove_dot_segments(path), safe="/~"),
        _canonical_query(bytes(scope.get("query_string", b"")).decode("latin-1")),
    ]
    lines += [f"{name}:{','.join(' '.join(v.split()) for v in headers[name])}" for name in signed]
    lines += ["", ";".join(signed), payload_hash]
    return "\n".join(lines)


def signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _split_credential(credential: str) -> tuple[str, str, str, str] | None:
    """KEY_ID/DAY/REGION/SERVICE/aws4_request → (KEY_ID, DAY, REGION, SERVICE)."""
    parts = credential.rsplit("/", 4)
    if len(parts) != 5 or parts[4] != "aws4_request" or not re.fullmatch(r"\d{8}", parts[1]):
        return None
    return parts[0], parts[1], parts[2], parts[3]


def _headers(scope: Scope) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in scope.get("headers", []):
        out.setdefault(bytes(key).decode("latin-1").lower(), []).append(
            bytes(value).decode("latin-1")
        )
    return out


def _one(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0].strip() if values and len(values) == 1 else None


def _canonical_query(query: str) -> str:
    """Names and values decoded, encoded again the one SigV4 way, sorted."""
    if not query:
        return ""
    pairs = []
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        pairs.append((_encode(unquote(key)), _encode(unquote(value))))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _encode(text: str) -> str:
    return quote(text, safe="-_.~")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986's dot-segment removal, and empty segments dropped, as botocore does."""
    if not path:
        return "/"
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment and segment != ".":
            out.append(segment)
    last = "/" if path.endswith("/") and out else ""
    return ("/" if path.startswith("/") else "") + "/".join(out) + last

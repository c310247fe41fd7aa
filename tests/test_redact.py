"""One rule for which names hold secrets, used by every function that shows a URL or an
option: source URIs, the store URL, storage options; and hidden values that keep two
URIs two."""

from __future__ import annotations

import re

import pytest

from ics_service.cli.config import _masked
from ics_service.redact import is_redacted, redact_uri, secret_name
from ics_service.sources import canonical_uri
from ics_service.store.connection import safe_url

HIDDEN = r"\*\*\*~[0-9a-f]{8}"

SECRET = (
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "X-Goog-Signature",
    "sig",
    "Signature",
    "Policy",
    "Key-Pair-Id",
    "AWSAccessKeyId",
    "GoogleAccessId",
    "key",
    "apikey",
    "api_key",
    "access_key",
    "account_key",
    "access_token",
    "auth",
    "password",
    "sslpassword",
    "passwd",
    "client_secret",
    "sas_token",
    "connection_string",
    "code",
)
PLAIN = ("n", "size", "width", "X-Amz-Date", "X-Amz-Expires", "sslmode", "endpoint_url", "anon")


@pytest.mark.parametrize("name", SECRET)
def test_every_shower_hides_a_secret_name(name: str) -> None:
    assert secret_name(name) and secret_name(name.upper())
    shown = redact_uri(f"http://h/a.jpg?{name}=VALUE1&n=1")
    assert re.fullmatch(rf"http://h/a\.jpg\?{re.escape(name)}={HIDDEN}&n=1", shown), shown
    store = safe_url(f"postgresql://u@db/ics?{name}=VALUE1")
    assert "VALUE1" not in store and f"{name}=***" in store, store
    # A URL that does not parse is hidden by the same rule.
    assert "VALUE1" not in safe_url(f"postgresql://u@db:port/ics?{name}=VALUE1")
    assert _masked({"storage": {name: "VALUE1"}}) == {"storage": {name: "***"}}


@pytest.mark.parametrize("name", PLAIN)
def test_every_shower_keeps_a_plain_name(name: str) -> None:
    assert not secret_name(name)
    assert redact_uri(f"http://h/a.jpg?{name}=v") == f"http://h/a.jpg?{name}=v"
    assert safe_url(f"postgresql://u@db/ics?{name}=v") == f"postgresql://u@db/ics?{name}=v"
    assert _masked({name: "v"}) == {name: "v"}


def test_uris_that_differ_only_in_a_secret_stay_two() -> None:
    cat, dog = redact_uri("http://h/img?key=cat.jpg"), redact_uri("http://h/img?key=dog.jpg")
    assert cat != dog and "cat" not in cat and "dog" not in dog
    assert re.fullmatch(rf"http://h/img\?key={HIDDEN}", cat), cat
    one, two = (redact_uri(f"http://alice:{p}@h/a.jpg") for p in ("pw1", "pw2"))
    assert one != two and re.fullmatch(rf"http://alice:{HIDDEN}@h/a\.jpg", one), one
    # The same URI is hidden the same way each time (a resume compares them), once only.
    for uri in (cat, one, redact_uri("http://TOKEN@h/a.jpg?sig=s&n=1")):
        assert redact_uri(uri) == uri and is_redacted(uri), uri
    assert not is_redacted("http://h/a.jpg?n=***") and not is_redacted("http://h/a.jpg")


def test_canonical_uri_lowercases_the_host_not_the_user_information() -> None:
    assert canonical_uri("HTTP://Alice:PaSS@Example.COM:80/A.jpg") == (
        "http://Alice:PaSS@example.com/A.jpg"
    )
    assert canonical_uri("https://u:p@EXAMPLE.com:443/x") == "https://u:p@example.com/x"

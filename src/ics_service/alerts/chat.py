"""Chat, e-mail and the rest through apprise URLs: `mailto://`, `slack://`, `discord://`,
`tgram://`, `json://`, ... (https://appriseit.com/services/): a title and a readable body.

apprise reports a failed notification as False plus warnings on its own logger, and its
warnings may quote a token from the URL. So its logger is kept out of every log, and what
it said is put, with the URL's secrets masked, into the DeliveryError ICS reports.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import apprise
from apprise.utils import cwe312

from ..errors import UsageError
from ..policies import transient_status
from .delivery import DeliveryError

# apprise's own tests for what in a URL is secret (its helpers carry no annotations).
_looks_secret: Callable[[str], str] = cwe312.cwe312_word
_loggable: Callable[[str], str] = cwe312.cwe312_loggable

#: Shown when apprise does not know a scheme (it knows over 100).
EXAMPLE_SCHEMES = ("mailto", "mailtos", "slack", "discord", "tgram", "msteams", "json", "form")

_MASK = "****"

# apprise's HTTP plugins end a failure warning with "error=STATUS"; its SMTP plugin logs
# the server's reply, "(CODE, b'text')", in a "Socket Exception" line at DEBUG.
_HTTP_STATUS = re.compile(r"error=(\d{3})\b")
_SMTP_REPLY = re.compile(r"\((\d{3}), b['\"]")
_WARNINGS = frozenset({"WARNING", "ERROR", "CRITICAL", "DEPRECATION WARNING"})


def _apprise_plugins() -> apprise.NotificationManager:
    """apprise's plugins, loaded once, with its logger kept out of every log."""
    # apprise propagates to the root logger; a host application (or pytest) that configures
    # root would print its warnings, tokens included. ICS reports failures itself.
    logging.getLogger(apprise.LOGGER_NAME).propagate = False
    plugins = apprise.NotificationManager()  # type: ignore[no-untyped-call]
    # Plugins load lazily on first use, and their optional dependencies warn as they import
    # (the e-mail plugin's PGP support imports the deprecated stdlib imghdr).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugins.load_modules()  # type: ignore[no-untyped-call]
    return plugins


def _secrets(url: str, shown: str | None) -> list[str]:
    """What to mask in text about `url`, longest first: its password, and every part of it
    that its plugin hides in the URL it shows (or, before there is one, that apprise's own
    test finds token-like)."""
    found = set()
    password = urlsplit(url).password
    if password:
        found.update({password, unquote(password)})
    visible = unquote(shown) if shown is not None else ""
    for part in re.split(r"[/:@?&=#,;]+", url.partition("://")[2]):
        for word in {part, unquote(part)}:
            hidden = word not in visible if shown is not None else _looks_secret(word) != word
            if len(word) >= 4 and hidden:
                found.add(word)
    return sorted(found, key=len, reverse=True)


def _mask(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, _MASK)
    return " ".join(text.split())


#: Parameters apprise writes into every URL it shows, at their defaults: noise in a log.
_DEFAULT_PARAMS = frozenset(
    {("overflow", "upstream"), ("retry", "0"), ("wait", "0.5"), ("optional", "no")}
)


def _without_defaults(shown: str, keep: set[str]) -> str:
    """`shown` without apprise's default parameters, nor the timeouts ICS set itself."""
    base, _, query = shown.partition("?")
    pairs = [
        (key, value)
        for key, value in parse_qsl(query, keep_blank_values=True)
        if key.lower() in keep
        or ((key, value) not in _DEFAULT_PARAMS and key not in ("cto", "rto"))
    ]
    return f"{base}?{urlencode(pairs)}" if pairs else base


class AppriseChannel:
    """Notifies one apprise URL with the alert's title and body."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        plugins = _apprise_plugins()
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        if not scheme or scheme not in plugins:
            raise UsageError(
                f"unknown alert channel scheme {scheme + '://' if scheme else repr(url)}: "
                f"use an apprise URL ({', '.join(s + '://' for s in EXAMPLE_SCHEMES)}, ...; "
                "see https://appriseit.com/services/)"
            )
        self.timeout_s = timeout_s
        self.asset = apprise.AppriseAsset(secure_logging=True)
        try:
            plugin = apprise.Apprise.instantiate(url, asset=self.asset, suppress_exceptions=False)
        except Exception as exc:  # apprise raises TypeError, ValueError and its own kinds
            detail = _mask(str(exc), _secrets(url, None)) or type(exc).__name__
            raise UsageError(f"alert channel {_loggable(url)} is not usable: {detail}") from None
        if plugin is None:
            raise UsageError(
                f"alert channel {_loggable(url)} is not usable: apprise cannot parse it "
                f"(see https://appriseit.com/services/ for the {scheme}:// form)"
            )
        query = {key.lower() for key, _ in parse_qsl(urlsplit(url).query)}
        # The plugins default to 4 s (15 s for SMTP); the URL's own cto/rto win.
        if "cto" not in query:
            plugin.socket_connect_timeout = timeout_s
        if "rto" not in query:
            plugin.socket_read_timeout = timeout_s
        self.plugin = plugin
        shown: str = plugin.url(privacy=True)  # type: ignore[no-untyped-call]
        self._shown = _without_defaults(shown, keep=query)
        self._secrets = _secrets(url, self._shown)
        self.apprise = apprise.Apprise(plugin, asset=self.asset)

    def shown(self) -> str:
        return self._shown

    def close(self) -> None:
        pass

    def send(
        self, alert: Mapping[str, Any], title: str, body: str, *, timeout_s: float | None = None
    ) -> None:
        """Notify with `title` and `body`; the alert itself is not sent. timeout_s: a
        shorter bound than the channel's own."""
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        # The call's timeout bounds the whole send, retries and slow servers included:
        # apprise stops waiting and reports TIMEOUT.
        # TEXT: apprise escapes and converts the body for plugins that want HTML or Markdown.
        result = self.apprise.notify(
            body=body,
            title=title,
            body_format=apprise.NotifyFormat.TEXT,
            timeout=timeout,
            log_level=logging.DEBUG,
        )
        if result:
            return
        said = [
            _mask(entry.message, self._secrets)
            for entry in result.logs()
            # At DEBUG only the underlying exception: other lines may quote whole requests.
            if entry.level in _WARNINGS or entry.message.startswith("Socket Exception")
        ]
        detail = "; ".join(dict.fromkeys(s for s in said if s))[:500]
        status = result.status
        if status == apprise.AppriseResultStatus.TIMEOUT:
            raise DeliveryError(
                f"{self.plugin.service_name} notification to {self._shown} did not finish "
                f"within {timeout:g} s" + (f": {detail}" if detail else "")
            )
        http = [int(code) for code in _HTTP_STATUS.findall(detail)]
        smtp = [int(code) for code in _SMTP_REPLY.findall(detail)]
        # A refusal (bad token or password, unknown channel, malformed request: HTTP 4xx,
        # SMTP 5xx) fails the same way each time; anything else (a connection error, HTTP
        # 5xx, SMTP 4xx) may pass later.
        refused = [c for c in http if not transient_status(c)]
        refused += [c for c in smtp if c >= 500]
        transient = not refused
        raise DeliveryError(
            f"{self.plugin.service_name} notification to {self._shown} failed: "
            + (detail or f"apprise reported {status.name}"),
            transient=transient,
        )

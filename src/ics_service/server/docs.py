"""`/docs`: the API's Swagger UI, served by ICS itself (no CDN), so it works offline.

The page and its assets (Swagger UI's script and style sheet, from the `fastapi-offline`
package, and ICS's own small script) hold no data: they are open to everyone. What the page
reads, `/openapi.json`, needs the API token unless `docs_public` is set; the page asks for
the token, keeps it in the tab's session storage (never in a URL or a cookie) and sends it
as `Authorization: Bearer` with every request it makes, "Try it out" included. A server
guarded by SigV4 keys alone has no token to ask for: its page says that only
`docs_public = true` opens the docs.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

router = APIRouter(include_in_schema=False)

#: Swagger UI's files, by the name ICS serves each under /docs/.
_ASSETS = {
    "swagger-ui-bundle.js": "swagger-ui-bundle.js",
    "swagger-ui.css": "swagger-ui.css",
    "favicon.png": "favicon.png",
}
#: Paths that need no credential whatever the settings: the page and what it loads.
OPEN_PATHS = frozenset({"/docs", "/docs/ics-docs.js", *(f"/docs/{n}" for n in _ASSETS)})

#: Only what the page's own origin serves; Swagger UI sets inline styles and data: images.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)
_CACHE = "public, max-age=86400"


@cache
def _static() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" type="image/png" href="/docs/favicon.png">
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body data-token="{token}" data-openapi="/openapi.json">
<form id="ics-token" hidden style="font-family: sans-serif; margin: 1em 2em">
<label>API token <input type="password" name="token" autocomplete="current-password"
 size="40"></label>
<button type="submit">Open the API docs</button>
<span id="ics-token-error" role="alert" style="color: #b00020"></span>
<p style="font-size: 0.9em">This server needs its API token (ICS_API_TOKEN) to show its API.
It stays in this browser tab only and goes with every request the page makes.</p>
</form>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/ics-docs.js"></script>
</body>
</html>
"""

_CLOSED_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
</head>
<body data-token="closed" style="font-family: sans-serif; margin: 1em 2em">
<p>This server accepts only AWS SigV4-signed requests (it has SigV4 keys and no API token),
which a browser cannot send, so its API description is not served here. Set
<code>docs_public = true</code> (ICS_DOCS_PUBLIC=1) to serve it, and this page, to anyone.</p>
</body>
</html>
"""

_SCRIPT = """"use strict";
(function () {
  var KEY = "ics-api-token";
  var body = document.body;
  var form = document.getElementById("ics-token");
  var error = document.getElementById("ics-token-error");
  var spec = body.dataset.openapi;

  function show(token) {
    form.hidden = true;
    SwaggerUIBundle({
      url: spec,
      dom_id: "#swagger-ui",
      deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
      layout: "BaseLayout",
      requestInterceptor: function (request) {
        if (token) {
          request.headers["Authorization"] = "Bearer " + token;
        }
        return request;
      },
    });
  }

  function tryToken(token) {
    return fetch(spec, { headers: { Authorization: "Bearer " + token } }).then(function (r) {
      return r.ok;
    });
  }

  if (body.dataset.token !== "required") {
    show(sessionStorage.getItem(KEY));
    return;
  }
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var token = form.elements.token.value.trim();
    tryToken(token).then(function (ok) {
      if (ok) {
        sessionStorage.setItem(KEY, token);
        show(token);
      } else {
        error.textContent = "That is not this server's API token.";
      }
    });
  });
  var saved = sessionStorage.getItem(KEY);
  if (saved) {
    tryToken(saved).then(function (ok) {
      if (ok) {
        show(saved);
      } else {
        sessionStorage.removeItem(KEY);
        form.hidden = false;
      }
    });
  } else {
    form.hidden = false;
  }
})();
"""


@router.get("/docs")
def docs_page(request: Request) -> HTMLResponse:
    title = html.escape(request.app.title)
    access = request.app.state.docs_access
    if access == "closed":
        page = _CLOSED_PAGE.format(title=title)
    else:
        page = _PAGE.format(title=title, token="required" if access == "token" else "none")
    return HTMLResponse(
        page, headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store"}
    )


@router.get("/docs/ics-docs.js")
def docs_script() -> Response:
    return Response(
        _SCRIPT, media_type="text/javascript; charset=utf-8", headers={"Cache-Control": _CACHE}
    )


@router.get("/docs/{name}")
def docs_asset(name: str) -> FileResponse:
    if name not in _ASSETS:
        # Only the names above: nothing else of the package's folder is served.
        raise HTTPException(404, f"no file {name!r} under /docs")
    return FileResponse(_static() / _ASSETS[name], headers={"Cache-Control": _CACHE})

"""`/docs`: Swagger UI served by ICS itself, every asset from the server (no CDN), the API
description behind the token unless the operator makes it public; in process and as a real
`ics serve`."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from ics_service.config import Settings
from ics_service.models.runtime import OnnxRuntime
from ics_service.server import create_app
from ics_service.server.docs import OPEN_PATHS
from serving import client_of, serve_process

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-docs-token"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def referenced(page: str) -> list[str]:
    """Every URL the page loads: scripts, style sheets, icons."""
    return re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', page)


async def check_docs(client: httpx.AsyncClient, *, public: bool) -> None:
    r = await client.get("/docs")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    page = r.text
    assert "://" not in page  # nothing from another origin
    assert f'data-token="{"none" if public else "required"}"' in page
    urls = referenced(page)
    assert sorted(urls) == sorted(OPEN_PATHS - {"/docs"}), urls
    kinds = {}
    for url in urls:
        asset = await client.get(url)  # no credential: the page and its assets are open
        assert asset.status_code == 200, (url, asset.text[:200])
        assert len(asset.content) > 100, url
        kinds[url.rsplit(".", 1)[1]] = asset.headers["content-type"]
    assert kinds["js"].startswith("text/javascript") and kinds["css"].startswith("text/css")
    script = (await client.get("/docs/ics-docs.js")).text
    assert "://" not in script and '"Bearer " + token' in script
    bundle = (await client.get("/docs/swagger-ui-bundle.js")).text
    assert "SwaggerUIBundle" in bundle
    for missing in ("/docs/core.py", "/docs/..%2F__init__.py", "/redoc"):
        r = await client.get(missing, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 404, missing


async def test_docs_are_served_locally_and_the_description_needs_the_token(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    settings = Settings(home=ics_home, api_token=TOKEN, record_realtime=False)
    async with client_of(create_app(settings, runtime=runtime)) as client:
        await check_docs(client, public=False)
        r = await client.get("/openapi.json")
        assert r.status_code == 401, r.text
        r = await client.get("/openapi.json", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 403, r.text
        r = await client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        spec = r.json()
        assert spec["openapi"].startswith("3.") and "/v1/executions" in spec["paths"]
        assert "/docs" not in spec["paths"]


async def test_public_docs_need_no_token_and_the_api_still_does(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    settings = Settings(home=ics_home, api_token=TOKEN, docs_public=True, record_realtime=False)
    async with client_of(create_app(settings, runtime=runtime)) as client:
        await check_docs(client, public=True)
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/v1/executions")).status_code == 401
    # With no token at all, everything is open, the docs too.
    settings = Settings(home=ics_home, record_realtime=False)
    async with client_of(create_app(settings, runtime=runtime)) as client:
        await check_docs(client, public=True)


async def test_with_sigv4_keys_alone_the_docs_page_says_docs_public_opens_it(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    settings = Settings(
        home=ics_home,
        record_realtime=False,
        sigv4_access_key_id="AKIADOCSTEST0000",
        sigv4_secret_access_key="secret",
    )
    async with client_of(create_app(settings, runtime=runtime)) as client:
        r = await client.get("/docs")
        assert r.status_code == 200, r.text
        # No token to ask for: no form asking for one, and no Swagger UI that could not load.
        assert 'data-token="closed"' in r.text and "docs_public = true" in r.text
        assert "ICS_API_TOKEN" not in r.text and not referenced(r.text)
        assert (await client.get("/openapi.json")).status_code == 401
    settings = settings.model_copy(update={"docs_public": True})
    async with client_of(create_app(settings, runtime=runtime)) as client:
        page = (await client.get("/docs")).text
        assert 'data-token="none"' in page and "/docs/ics-docs.js" in referenced(page)
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/v1/executions")).status_code == 401


def test_a_real_server_serves_the_docs_and_every_asset_itself(ics_home: Path) -> None:
    env = {**os.environ, "ICS_API_TOKEN": TOKEN}
    with (
        serve_process(env=env) as served,
        httpx.Client(base_url=served.url, timeout=30) as client,
    ):
        page = client.get("/docs")
        assert page.status_code == 200, page.text
        for url in referenced(page.text):
            assert url.startswith("/"), url  # this server, no CDN
            assert client.get(url).status_code == 200, url
        assert client.get("/openapi.json").status_code == 401
        spec = client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
        assert spec.status_code == 200 and "/v1/classify" in spec.json()["paths"]


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test installs it)"
)
def test_a_browser_opens_the_docs_with_the_token(ics_home: Path) -> None:
    """Headless Chromium, offline: the page asks for the token, refuses a wrong one, and
    with the right one shows the API (its requests carry it); a reload keeps it."""
    from playwright import sync_api  # the test extra; Chromium comes from Debian

    env = {**os.environ, "ICS_API_TOKEN": TOKEN}
    with serve_process(env=env) as served, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.goto(f"{served.url}/docs")
            page.wait_for_selector("#ics-token:not([hidden])", timeout=15_000)
            page.fill("input[name=token]", "wrong")
            page.click("button[type=submit]")
            page.wait_for_function(
                "document.getElementById('ics-token-error').textContent.length > 0",
                timeout=15_000,
            )
            page.fill("input[name=token]", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            assert any("/v1/executions" in path for path in paths), paths
            page.reload()
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        finally:
            browser.close()

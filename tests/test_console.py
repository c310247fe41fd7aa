"""The web console of `ics serve`: sign-in, the executions and item pages, pictures, CSRF,
escaping; in process, and in real headless Chromium against a real `ics serve`."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from cli import ics
from ics_service.config import Settings
from ics_service.models.runtime import OnnxRuntime
from ics_service.server import create_app
from serving import client_of, finished, serve_process

TOKEN = "console-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
HTML = {"Accept": "text/html"}
HOSTILE = "<img src=x onerror=alert(1)>.jpg"
CHROMIUM = Path("/usr/bin/chromium")
#: Where the browser test leaves its screenshots of the pages.
ARTIFACTS = Path(os.environ.get("ICS_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def folder(tmp_path: Path, photos: Path) -> Path:
    """The photos, one of them under a name that is HTML, and a file that is no image."""
    out = tmp_path / "in"
    shutil.copytree(photos, out)
    first = sorted(out.iterdir())[0]
    shutil.copy(first, out / HOSTILE)
    (out / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return out


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page[:500]
    return found.group(1)


@asynccontextmanager
async def classified(
    home: Path, folder: Path, runtime: OnnxRuntime
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A server with a token that has classified `folder` (its one broken file FAILED), and
    a client of it without credentials."""
    settings = Settings(
        home=home,
        api_token=TOKEN,
        allowed_sources=[str(folder)],
        record_realtime=False,
        tolerated_failure_percentage=100.0,
    )
    async with client_of(create_app(settings, runtime=runtime)) as client:
        r = await client.post("/v1/executions", json={"sources": [str(folder)]}, headers=BEARER)
        assert r.status_code == 202, r.text
        execution_id = r.json()["execution_id"]
        client.headers.update(BEARER)  # the API's polling, with the token
        doc = await finished(client, execution_id)
        assert doc["counts"]["FAILED"] == 1, doc
        del client.headers["Authorization"]
        yield client, execution_id


@pytest.mark.anyio
async def test_pages_need_a_session_and_show_what_the_store_holds(
    ics_home: Path, folder: Path, runtime: OnnxRuntime
) -> None:
    async with classified(ics_home, folder, runtime) as (client, execution_id):
        # No session: a browser goes to the sign-in page, anything else is refused.
        r = await client.get("/", headers=HTML)
        assert r.status_code == 303 and r.headers["location"] == "/signin?next=/"
        r = await client.get(f"/executions/{execution_id}")
        assert r.status_code == 401
        r = await client.get("/signin", headers=HTML)
        assert r.status_code == 200 and 'name="token"' in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"]
        r = await client.post("/signin", data={"token": "wrong", "next": "/"})
        assert r.status_code == 401 and "not the API token of this server" in r.text
        assert "set-cookie" not in r.headers
        # Only this server's paths are followed after signing in.
        r = await client.post("/signin", data={"token": TOKEN, "next": "//evil.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie

        # Signed in (the client keeps the cookie).
        r = await client.get("/", headers=HTML)
        assert r.status_code == 200, r.text
        assert execution_id in r.text and "SUCCEEDED" in r.text
        r = await client.get(f"/executions/{execution_id}", headers=HTML)
        assert r.status_code == 200
        page = r.text
        for state in ("SerializeImageData", "ClassifyImage", "FilterLowConfidence", "Notify"):
            assert state in page
        assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in page
        assert "<img src=x" not in page
        assert "InvalidImage" in page
        # The confidence histogram, with the threshold's line; the most frequent labels.
        assert '<svg viewBox="0 0 100 100" class="histogram"' in page
        assert 'class="threshold"' in page and "Most frequent labels" in page
        # Filters: an empty field is "any"; a label; a confidence range; sorted.
        r = await client.get(
            f"/executions/{execution_id}",
            params={"status": "", "label": "", "min_confidence": "", "max_confidence": ""},
            headers=HTML,
        )
        assert r.status_code == 200
        r = await client.get(
            f"/executions/{execution_id}", params={"min_confidence": "2"}, headers=HTML
        )
        assert r.status_code == 400 and "from 0 to 1" in r.text
        api = await client.get(f"/v1/executions/{execution_id}/results", headers=BEARER)
        rows = api.json()["results"]
        label = next(row["label"] for row in rows if row["label"])
        filtered = await client.get(
            f"/v1/executions/{execution_id}/results",
            params={"label": label, "min_confidence": 0.0},
            headers=BEARER,
        )
        want = [row["item_id"] for row in rows if row["label"] == label]
        assert [row["item_id"] for row in filtered.json()["results"]] == want
        r = await client.get(
            f"/executions/{execution_id}", params={"sort": "confidence"}, headers=HTML
        )
        shown = [float(c) for c in re.findall(r"<td>(0\.\d{3})</td>", r.text)]
        assert len(shown) == len([row for row in rows if row["confidence"] is not None])
        assert shown == sorted(shown)
        # The items of one status, and an item's page.
        r = await client.get(f"/executions/{execution_id}?status=FAILED", headers=HTML)
        assert "broken.jpg" in r.text and "onerror" not in r.text
        items = re.findall(rf'href="/executions/{execution_id}/items/(\d+)"', page)
        r = await client.get(f"/executions/{execution_id}/items/{items[0]}", headers=HTML)
        assert r.status_code == 200 and "<meter" in r.text
        # Pictures: the item's own image, square; an item that is no image has none.
        r = await client.get(f"/executions/{execution_id}/items/{items[0]}/picture/thumb")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (160, 160)
        cached = list((ics_home / "cache" / "pictures").glob("*/*.jpg"))
        assert len(cached) == 1
        assert (await client.get(cached_path(execution_id, items[0], "view"))).status_code == 200
        broken = await failed_item(client, execution_id)
        assert (await client.get(cached_path(execution_id, broken, "thumb"))).status_code == 404
        assert (await client.get(f"/executions/{execution_id}/items/999999")).status_code == 404

        # Forms need their session's CSRF value.
        r = await client.post(f"/executions/{execution_id}/resume", data={"csrf": "forged"})
        assert r.status_code == 403 and "stale or came from another site" in r.text
        r = await client.post(f"/executions/{execution_id}/resume", data={"csrf": csrf_of(page)})
        assert r.status_code == 400 and "every item has its result" in r.text
        # Large bodies are not read for a form that has not proved who sent it.
        client.cookies.clear()
        r = await client.post("/signin", content=b"token=" + b"x" * 100_000)
        assert r.status_code == 413
        # A script's bearer token opens the pages too.
        assert (await client.get("/", headers=BEARER)).status_code == 200
        r = await client.post("/signout", headers=BEARER)
        assert r.status_code == 303


def cached_path(execution_id: str, item: str, size: str) -> str:
    return f"/executions/{execution_id}/items/{item}/picture/{size}"


async def failed_item(client: httpx.AsyncClient, execution_id: str) -> str:
    r = await client.get(f"/executions/{execution_id}?status=FAILED", headers=HTML)
    found = re.search(rf'href="/executions/{execution_id}/items/(\d+)"', r.text)
    assert found, r.text
    return found.group(1)


@pytest.mark.anyio
async def test_an_open_server_has_an_open_console_whose_forms_still_need_csrf(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    app = create_app(Settings(home=ics_home, record_realtime=False), runtime=runtime)
    async with client_of(app) as client:
        r = await client.get("/", headers=HTML)
        assert r.status_code == 200 and "No executions" in r.text
        assert "ics_session=" in r.headers["set-cookie"]
        assert (await client.get("/signin")).status_code == 303
        r = await client.post("/signout", data={"csrf": "forged"})
        assert r.status_code == 403


@pytest.mark.anyio
async def test_with_sigv4_keys_alone_the_console_is_closed(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    settings = Settings(
        home=ics_home,
        record_realtime=False,
        sigv4_access_key_id="AKIDCONSOLE",
        sigv4_secret_access_key="secret-console",
    )
    app = create_app(settings, runtime=runtime)
    async with client_of(app) as client:
        r = await client.get("/", headers=HTML)
        assert r.status_code == 303
        r = await client.get("/signin", headers=HTML)
        assert "guarded by AWS SigV4 keys alone" in r.text
        assert 'name="token"' not in r.text


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test installs it)"
)
def test_a_browser_signs_in_and_watches_an_execution_run(
    ics_home: Path, tmp_path: Path, photos: Path
) -> None:
    """Headless Chromium, offline: sign in, watch a running execution's progress move
    without a reload, open it, filter its items, open an item, cancel it; a screenshot of
    each page goes to the artifacts folder."""
    from playwright import sync_api  # the test extra; Chromium comes from Debian

    many = tmp_path / "many"
    many.mkdir()
    originals = sorted(photos.iterdir())
    for i in range(1500):
        os.link(
            originals[i % len(originals)], many / f"{i:04d}-{originals[i % len(originals)].name}"
        )
    env = {**os.environ, "ICS_API_TOKEN": TOKEN, "ICS_ALLOWED_SOURCES": f'["{many}"]'}
    shots = ARTIFACTS / "console"
    shots.mkdir(parents=True, exist_ok=True)
    with serve_process(env=env) as served, sync_api.sync_playwright() as p:
        r = httpx.post(
            f"{served.url}/v1/executions",
            json={"sources": [str(many)], "name": "browser-run"},
            headers=BEARER,
            timeout=30,
        )
        assert r.status_code == 202, r.text
        execution_id = r.json()["execution_id"]
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.goto(f"{served.url}/")
            assert "/signin" in page.url
            page.screenshot(path=str(shots / "signin.png"))
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector("table.executions")
            row = page.locator("tr[data-progress-url]")
            start = int(row.locator("[data-field=done]").inner_text())
            page.evaluate("window.__sameDocument = true")
            # Polled from here: the page's CSP forbids the eval of wait_for_function.
            done = row.locator("[data-field=done]")
            deadline = time.monotonic() + 60
            while int(done.inner_text()) <= start:
                assert time.monotonic() < deadline, "the progress did not move"
                time.sleep(0.2)
            assert page.evaluate("window.__sameDocument") is True  # no reload
            page.screenshot(path=str(shots / "executions.png"))
            page.click("text=browser-run")
            page.wait_for_selector("ol.workflow")
            page.screenshot(path=str(shots / "execution.png"), full_page=True)
            page.select_option("#item-status", "LOW_CONFIDENCE")
            page.click("form.filters button")
            page.wait_for_url(re.compile(r"status=LOW_CONFIDENCE"))
            statuses = page.locator("table.items .status").all_inner_texts()
            assert statuses and set(statuses) == {"LOW_CONFIDENCE"}, statuses
            page.locator("table.items a").first.click()
            page.wait_for_selector("table.topk")
            deadline = time.monotonic() + 30
            while page.evaluate("document.querySelector('.item img').naturalWidth") != 448:
                assert time.monotonic() < deadline, "the item's picture did not load"
                time.sleep(0.2)
            page.screenshot(path=str(shots / "item.png"), full_page=True)
            page.goto(f"{served.url}/executions/{execution_id}")
            page.click("text=Cancel")
            page.wait_for_selector(".summary [data-field=status]")
            reviewed = review_from_the_keyboard(page, served.url, shots)
        finally:
            browser.close()
        deadline = time.monotonic() + 60
        while True:
            doc: dict[str, Any] = httpx.get(
                f"{served.url}/v1/executions/{execution_id}", headers=BEARER, timeout=30
            ).json()
            if doc["status"] != "RUNNING":
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.2)
        assert doc["status"] == "ABORTED", doc
        # The answers, through the API and exported as a Ground Truth manifest.
        r = httpx.get(f"{served.url}/v1/reviews", headers=BEARER, timeout=30)
        answers = {(a["item_id"], a["verdict"], a["label"]) for a in r.json()["reviews"]}
        assert answers == set(reviewed), (answers, reviewed)
    manifest = tmp_path / "reviews.manifest"
    out = ics("review", "export", "--format", "sagemaker-ground-truth", "--out", str(manifest))
    assert "4 labelled items written" in out.stderr
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(
        (m["ics-review-metadata"]["ics-item-id"], m["ics-review-metadata"]["class-name"])
        for m in lines
    ) == sorted((i, label) for i, _, label in reviewed)
    assert all(
        m["source-ref"].startswith(str(many)) and isinstance(m["ics-review"], int) for m in lines
    )
    assert {m["ics-review-metadata"]["human-annotated"] for m in lines} == {"yes"}


def review_from_the_keyboard(page: Any, url: str, shots: Path) -> list[tuple[str, str, str]]:
    """Five answers from the keyboard: accept, pick the second label, type a label, none of
    these, undo (then accept it); the (item, verdict, label) that stand."""

    def item() -> str:
        return str(page.locator("input[name=item_id]").get_attribute("value"))

    def top(rank: int) -> str:
        text: str = page.locator(f"button[data-key='{rank}']").inner_text()
        return text.split(". ", 1)[1].rsplit(" ", 1)[0]

    def answered(item_id: str) -> None:
        """Wait for the page after the answer to this item (the URL names it last)."""
        page.wait_for_url(re.compile(rf"last=[^&]*%3A{item_id}(&|$)"))

    page.goto(f"{url}/review")
    page.wait_for_selector("[data-review]")
    page.screenshot(path=str(shots / "review.png"), full_page=True)
    page.fill("#reviewer", "Ana Reviewer")
    page.keyboard.press("Escape")
    answers = []
    first, label = item(), top(1)
    page.keyboard.press("Enter")  # accept
    answered(first)
    answers.append((first, "accepted", label))
    second, label = item(), top(2)
    page.keyboard.press("2")  # the second of the top k
    answered(second)
    answers.append((second, "relabelled", label))
    assert item() != second
    third, label = item(), top(1)
    page.keyboard.press("t")
    page.keyboard.type("bubble")
    page.keyboard.press("Enter")  # the label typed
    answered(third)
    answers.append((third, "relabelled" if label != "bubble" else "accepted", "bubble"))
    fourth = item()
    page.keyboard.press("n")  # none of these
    answered(fourth)
    page.keyboard.press("u")  # undo: the fourth is shown again
    page.wait_for_url(re.compile(r"item="))
    assert item() == fourth
    label = top(1)
    page.keyboard.press("a")
    answered(fourth)
    answers.append((fourth, "accepted", label))
    return answers


@pytest.mark.anyio
async def test_review_answers_are_checked_and_one_per_item(
    ics_home: Path, folder: Path, runtime: OnnxRuntime
) -> None:
    async with classified(ics_home, folder, runtime) as (client, _):
        await client.post("/signin", data={"token": TOKEN, "next": "/"})
        page = (await client.get("/review", headers=HTML)).text
        assert "<img src=x" not in page  # the hostile name, if shown, is text
        fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', page))
        base = {k: fields[k] for k in ("csrf", "execution_id", "item_id", "order", "after")}

        async def answer(**form: str) -> httpx.Response:
            return await client.post("/review", data={**base, **form})

        r = await answer(action="accept")
        assert r.status_code == 400 and "give your name" in r.text
        r = await answer(action="type", label="no such label", reviewer="ana")
        assert r.status_code == 400 and "is not a label of model efficientnet-lite0" in r.text
        r = await answer(action="pick:9", reviewer="ana")
        assert r.status_code == 400
        r = await client.post("/review", data={**base, "csrf": "forged", "action": "none"})
        assert r.status_code == 403
        r = await answer(action="type", label="espresso", reviewer="ana")
        assert r.status_code == 303 and "ics_reviewer=ana" in r.headers["set-cookie"]
        r = await answer(action="none", reviewer="bo")
        assert r.status_code == 409 and "reviewed already by ana" in r.text
        r = await client.get("/v1/reviews", params={"limit": 1}, headers=BEARER)
        (only,) = r.json()["reviews"]
        assert (only["item_id"], only["label"], only["reviewer"]) == (
            base["item_id"],
            "espresso",
            "ana",
        )
        assert r.json()["next"] is None
        item = f"{base['execution_id']}:{base['item_id']}"
        r = await client.post("/review/undo", data={"csrf": base["csrf"], "item": item})
        assert r.status_code == 303
        assert (await client.get("/v1/reviews", headers=BEARER)).json()["reviews"] == []

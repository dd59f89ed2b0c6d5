"""The chat page at /ui in a real headless browser (Debian's chromium via playwright).

Each test drives the page as a user would: type, click, read what the page shows. The
server is a real `levante serve` process; its /metrics tell whether Stop really aborted
the generation.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

    from conftest import Server

pytestmark = pytest.mark.slow

BOT = "#chat [data-testid='bot']"


def open_ui(browser: Browser, url: str, wait_for_model: bool = True, outside: list[str] | None = None) -> Page:
    """The page at {url}/ui, loaded; requests to anywhere but the server are appended to `outside`."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    if outside is not None:
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
    page.goto(f"{url}/ui")
    page.wait_for_selector("#send", timeout=60_000)
    if wait_for_model:  # the page's load event filled the model picker from /v1/models
        page.wait_for_function("document.querySelector('#model input')?.value?.length > 0", timeout=30_000)
    return page


def set_number(page: Page, selector: str, value: float) -> None:
    field = page.locator(f"{selector} input[type=number]").first
    field.fill(str(value))
    field.press("Tab")  # Gradio commits a number on change/blur


def send(page: Page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()


def ask(page: Page, text: str, timeout: float = 120) -> str:
    """Send `text`, wait for the complete answer; returns the status line."""
    before = page.locator(BOT).count()
    send(page, text)
    page.wait_for_function(f"document.querySelectorAll(\"{BOT}\").length > {before}", timeout=30_000)
    return wait_done(page, timeout)


def bot_text(page: Page) -> str:
    replies = page.locator(BOT)
    return replies.last.inner_text() if replies.count() else ""


def status(page: Page) -> str:
    return page.locator("#status [data-testid='markdown']").inner_text().strip()


def is_done(text: str) -> bool:
    return bool(text) and "Generating" not in text


def wait_done(page: Page, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_done(status(page)):
            return status(page)
        time.sleep(0.1)
    raise AssertionError(f"no answer within {timeout}s; page shows {bot_text(page)!r}, status {status(page)!r}")


def running(url: str) -> float:
    """levante:num_requests_running summed over models, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(r"^levante:num_requests_running\{[^}]*\} (\S+)$", text, re.M))


@pytest.fixture
def outside() -> list[str]:
    return []


@pytest.fixture
def page(browser: Browser, smollm2_server: Server, outside: list[str]) -> Iterator[Page]:
    page = open_ui(browser, smollm2_server.url, outside=outside)
    yield page
    page.close()


def test_chat_streams_reply(page: Page, smollm2_server: Server, artifacts: Path, outside: list[str]) -> None:
    set_number(page, "#temperature", 0)
    set_number(page, "#max-tokens", 96)
    send(page, "Write a short paragraph about the Mistral wind in France.")
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while not is_done(status(page)) and time.monotonic() < deadline:
        text = bot_text(page)
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.05)
    final = bot_text(page)
    assert final.strip(), f"the reply ended empty; status {status(page)!r}, seen {seen!r}"
    assert "⚠" not in final, final
    partial = [t for t in seen if t != final]
    assert len(partial) >= 2, f"the reply did not grow in steps while streaming: {seen!r}"
    assert all(len(a) <= len(b) for a, b in itertools.pairwise(seen)), seen
    assert re.search(r"\d+ tokens", status(page)), status(page)
    page.screenshot(path=str(artifacts / "ui-chat.png"), full_page=True)
    assert outside == [], f"the page fetched from outside the server: {outside}"


def test_stop_aborts_generation_and_new_chat_clears(page: Page, smollm2_server: Server) -> None:
    set_number(page, "#max-tokens", 2000)
    send(page, "Count from 1 to 1000, writing every number in words, one per line.")
    page.wait_for_function(f"document.querySelector(\"{BOT}\")?.innerText?.length > 10", timeout=120_000)
    assert running(smollm2_server.url) == 1, "the generation should still be running"
    send(page, "And another question?")  # held back while an answer streams
    time.sleep(1)
    assert page.locator("#chat [data-testid='user']").count() == 1
    assert page.locator("#message textarea").input_value() == "And another question?"
    page.locator("#stop").click()
    page.wait_for_function("document.querySelector(\"#status [data-testid='markdown']\")?.innerText?.includes('Stopped')",
                           timeout=10_000)
    deadline = time.monotonic() + 15
    while running(smollm2_server.url) != 0:
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.2)
    stopped = bot_text(page)
    time.sleep(1.5)
    assert bot_text(page) == stopped, "the reply kept growing after Stop"
    assert stopped.strip()

    page.locator("#new-chat").click()
    page.wait_for_function(f"document.querySelectorAll(\"{BOT}, #chat [data-testid='user']\").length === 0", timeout=10_000)
    assert status(page) == ""
    # the conversation really starts over: a new question gets a new, complete answer
    set_number(page, "#max-tokens", 8)
    ask(page, "Hi")
    assert page.locator("#chat [data-testid='user']").count() == 1
    assert bot_text(page).strip()


def test_api_key_is_required_and_sent(browser: Browser, keyed_server: Server, artifacts: Path) -> None:
    server = keyed_server
    assert httpx.get(f"{server.url}/v1/models").status_code == 401, "the UI must not open the API"
    page = open_ui(browser, server.url, wait_for_model=False)  # the page and its assets load without a key
    try:
        key = page.locator("#api-key input")
        key.wait_for(state="visible", timeout=30_000)
        set_number(page, "#max-tokens", 8)
        assert ask(page, "Hello") == "error 401"
        assert "Authentication failed (401)" in bot_text(page), bot_text(page)

        key.fill("wrong")
        assert ask(page, "Hello again") == "error 401"
        assert "invalid API key" in bot_text(page), bot_text(page)
        page.screenshot(path=str(artifacts / "ui-auth.png"), full_page=True)

        key.fill("k1")
        key.press("Enter")  # reloads the model list with the key
        page.wait_for_function("document.querySelector('#model input')?.value?.length > 0", timeout=30_000)
        page.locator("#new-chat").click()
        page.wait_for_function(f"document.querySelectorAll(\"{BOT}\").length === 0", timeout=10_000)
        assert re.search(r"\d+ tokens", ask(page, "Say hello.")), status(page)
        assert bot_text(page).strip() and "⚠" not in bot_text(page), bot_text(page)
    finally:
        page.close()


def test_rag_upload_and_sources(page: Page, smollm2_server: Server, tmp_path: Path, artifacts: Path) -> None:
    if httpx.get(f"{smollm2_server.url}/v1/rag/collections", timeout=10).status_code == 404:
        pytest.skip("this server has no RAG routes yet (GET /v1/rag/collections answers 404)")
    doc = tmp_path / "zorblat-facts.txt"
    doc.write_text("Field notes. The zorblat is a small purple bird that lives only on Mount Quennel. "
                   "Its favourite food is copper wire, and it sings at exactly 4 o'clock.\n")
    name = f"ui-{int(time.time())}"
    page.locator("#new-collection textarea").fill(name)
    page.locator("#create-collection").click()
    page.wait_for_function(f"document.querySelector('#collection input')?.value === '{name}'", timeout=30_000)

    page.locator("#upload input[type=file]").set_input_files(str(doc))
    page.wait_for_function("document.querySelector('#upload-result')?.innerText?.includes('zorblat-facts.txt')", timeout=180_000)
    assert "⚠" not in page.locator("#upload-result").inner_text(), page.locator("#upload-result").inner_text()

    page.locator("#collection input").click()  # choose it from the picker, as a user would
    page.get_by_role("option", name=name, exact=True).click()
    set_number(page, "#temperature", 0)
    set_number(page, "#max-tokens", 48)
    ask(page, "What is the favourite food of the zorblat?")
    sources = page.locator("#sources").inner_text()
    assert "zorblat-facts.txt" in sources, sources
    assert bot_text(page).strip() and "⚠" not in bot_text(page), bot_text(page)
    page.screenshot(path=str(artifacts / "ui-rag.png"), full_page=True)

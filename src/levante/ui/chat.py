"""The chat page: a Gradio app mounted on the server at /ui.

The page is a thin client of the server's own HTTP API. Its handlers run in the server
process but call `/v1/models`, `/v1/chat/completions` (streamed) and `/v1/rag/...` over HTTP on
the very socket the browser reached, so API keys, limits, metrics and request logs apply to
the UI exactly as to any other client. The API key a user types is kept in the page and sent
as `Authorization: Bearer` with each call; the server never stores it.

Stop and New chat cancel the streaming handler; leaving its `async with` closes the HTTP
stream, and the server aborts a generation whose client went away (its KV blocks are freed).
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import gradio as gr
import httpx
from fastapi import FastAPI

UI_PATH = "/ui"
NO_COLLECTION = "(none)"
ERROR_MARK = "⚠️ "  # starts an error shown in the chat; such text is not sent back as history
STREAM_UPDATE_SECONDS = 0.05  # coalesce token deltas: each page update re-sends the last message
KEY_HINT = "enter a valid key in the **API key** field"
GENERATING = "Generating…"  # the status line while an answer streams


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def markdown(self) -> str:
        if self.status == 401:
            return f"{ERROR_MARK}**Authentication failed (401):** {self.message}. This server needs an API key: {KEY_HINT}."
        return f"{ERROR_MARK}**Error{f' {self.status}' if self.status else ''}:** {self.message}"


def _error_message(response: httpx.Response) -> str:
    """The message of any API family's error body (OpenAI, TGI/Ollama, FastAPI)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if error:
        return str(error)
    return str(body.get("detail") if isinstance(body, dict) and "detail" in body else body)


@dataclass
class Api:
    """The server's HTTP API, called back on the address the browser's request came in on."""

    base_url: str
    key: str = ""

    def _client(self, timeout: float | None = 30.0) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.key.strip()}"} if self.key.strip() else {}
        # trust_env=False: never route these loopback calls through an HTTP(S)_PROXY
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, trust_env=False,
                                 timeout=httpx.Timeout(timeout, connect=10.0))

    async def _json(self, method: str, path: str, timeout: float | None = 30.0, **kwargs: Any) -> Any:
        async with self._client(timeout) as client:
            response = await client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise ApiError(response.status_code, _error_message(response))
        return response.json()

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._json("GET", "/v1/models"))["data"]]

    async def collections(self) -> list[dict[str, Any]] | None:
        """The RAG collections, or None when this server has no RAG routes."""
        try:
            return list((await self._json("GET", "/v1/rag/collections"))["data"])
        except ApiError as e:
            if e.status in (404, 405):
                return None
            raise

    async def create_collection(self, name: str) -> None:
        await self._json("POST", "/v1/rag/collections", json={"name": name})

    async def upload(self, collection: str, paths: list[str]) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            files = [
                ("files", (Path(p).name, stack.enter_context(open(p, "rb")), mimetypes.guess_type(p)[0] or "application/octet-stream"))
                for p in paths
            ]
            result: dict[str, Any] = await self._json("POST", f"/v1/rag/collections/{quote(collection, safe='')}/files", timeout=900.0, files=files)
        return result

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The server-sent events of a streamed chat completion, as dicts; errors raise ApiError."""
        async with self._client(timeout=None) as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise ApiError(response.status_code, _error_message(response))
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:  # failed after the 200 was sent: no status code to report
                    error = event["error"]
                    raise ApiError(0, str(error.get("message", error) if isinstance(error, dict) else error))
                yield event


def _text(content: Any) -> str:
    """A Chatbot message's text: Gradio hands content over as a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(_text(part) for part in content)
    return ""


def to_api_messages(history: list[dict[str, Any]], system: str) -> list[dict[str, str]]:
    """The chat history as OpenAI messages, without the errors the page showed in it."""
    messages = [{"role": "system", "content": system.strip()}] if system.strip() else []
    for message in history:
        text = _text(message.get("content"))
        if message.get("role") == "assistant":
            text = text.split("\n\n" + ERROR_MARK)[0]
            if text.startswith(ERROR_MARK) or not text:
                continue
        messages.append({"role": str(message.get("role")), "content": text})
    return messages


def _cell(text: Any, limit: int = 0) -> str:
    value = " ".join(str(text if text is not None else "").split()).replace("|", "\\|")
    return value[: limit - 1] + "…" if limit and len(value) > limit else value


def _count(n: Any, noun: str) -> str:
    n = int(n or 0)
    return f"{n} {noun}{'' if n == 1 else 's'}"


def sources_markdown(sources: list[dict[str, Any]]) -> str:
    if not sources:
        return "**Sources:** no passage of the collection matched."
    rows = ["**Sources**", "", "| # | file | page | score | passage |", "| --- | --- | --- | --- | --- |"]
    for i, s in enumerate(sources, 1):
        score = s.get("score")
        rows.append(f"| {i} | {_cell(s.get('file'))} | {_cell(s.get('page', ''))} | "
                    f"{f'{score:.3f}' if isinstance(score, (int, float)) else ''} | {_cell(s.get('text'), 160)} |")
    return "\n".join(rows)


def upload_markdown(result: dict[str, Any]) -> str:
    """One line per file (the panel is narrow): name, status, pages and chunks, or the error."""
    lines = [f"Uploaded to **{_cell(result.get('collection'))}**:"]
    for f in result.get("files", []):
        error = f.get("error")
        detail = f"{ERROR_MARK}{_cell(error)}" if error else f"{_count(f.get('pages'), 'page')}, {_count(f.get('chunks'), 'chunk')}"
        lines.append(f"- **{_cell(f.get('file'))}**: {_cell(f.get('status'))}, {detail}")
    return "\n".join(lines)


def _status(model: str, usage: dict[str, Any] | None, seconds: float) -> str:
    if not usage:
        return f"{model} · {seconds:.1f} s"
    tokens = int(usage.get("completion_tokens", 0))
    return f"{model} · {tokens} tokens · {seconds:.1f} s · {tokens / max(seconds, 1e-6):.1f} tokens/s"


class ChatUI:
    """The page's event handlers; `fallback_url` is used when a request carries no socket address."""

    def __init__(self, fallback_url: str) -> None:
        self.fallback_url = fallback_url

    def api(self, request: gr.Request | None, key: str) -> Api:
        return Api(self.base_url(request), key or "")

    def base_url(self, request: gr.Request | None) -> str:
        """The address the browser's connection reached: calls go back through the same server socket."""
        raw = getattr(request, "request", None) if request is not None else None
        scope = getattr(raw, "scope", None) or {}
        server = scope.get("server")
        if not server:
            return self.fallback_url
        host, port = server[0], server[1]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if scope.get('scheme') in ('https', 'wss') else 'http'}://{host}:{port}"

    async def load(self, key: str, model: str | None, request: gr.Request) -> tuple[Any, Any, str]:
        """Fill the model picker; show the key field when the server asks for one."""
        api = self.api(request, key)
        status, models, needs_key = "", [], False
        try:
            models = await api.models()
        except ApiError as e:
            needs_key = e.status == 401
            status = f"🔒 This server needs an API key: {KEY_HINT}." if needs_key and not key else e.markdown()
        except httpx.HTTPError as e:
            status = f"{ERROR_MARK}cannot reach the API at {api.base_url}: {e}"
        chosen = model if model in models else (models[0] if models else None)
        return gr.Textbox(visible=needs_key or bool(key)), gr.Dropdown(choices=models, value=chosen), status

    async def collections(self, key: str, collection: str | None, request: gr.Request) -> tuple[Any, str, Any, Any]:
        """(collection picker, note, upload widget, create button), the last two enabled when RAG is available."""
        picker, note, available = await self._collections(self.api(request, key), collection)
        return picker, note, gr.File(interactive=available), gr.Button(interactive=available)

    async def _collections(self, api: Api, selected: str | None) -> tuple[Any, str, bool]:
        none = gr.Dropdown(choices=[NO_COLLECTION], value=NO_COLLECTION)
        try:
            found = await api.collections()
        except ApiError as e:
            return none, "🔒 Enter the API key to see the collections." if e.status == 401 else e.markdown(), False
        except httpx.HTTPError as e:
            return none, f"{ERROR_MARK}{e}", False
        if found is None:
            return none, "Document collections are not available on this server.", False
        names = [str(c["name"]) for c in found]
        note = "\n".join(f"- **{_cell(c['name'])}**: {_count(c.get('documents'), 'document')}, {_count(c.get('chunks'), 'chunk')}"
                         for c in found)
        value = selected if selected in names else NO_COLLECTION
        return gr.Dropdown(choices=[NO_COLLECTION, *names], value=value), note or "No collection yet: create one below.", True

    async def create_collection(self, name: str, key: str, request: gr.Request) -> tuple[Any, str, str]:
        api = self.api(request, key)
        name = name.strip()
        if not name:
            picker, note, _ = await self._collections(api, None)
            return picker, note, ""
        try:
            await api.create_collection(name)
        except (ApiError, httpx.HTTPError) as e:
            picker, _, _ = await self._collections(api, None)
            return picker, e.markdown() if isinstance(e, ApiError) else f"{ERROR_MARK}{e}", name
        picker, note, _ = await self._collections(api, name)
        return picker, note, ""

    async def upload(self, paths: list[str] | None, collection: str | None, key: str, request: gr.Request) -> tuple[Any, str, Any, str]:
        """Post the files to the chosen collection; Gradio's temporary copies are deleted afterwards."""
        api = self.api(request, key)
        try:
            if not paths:
                return None, "", gr.skip(), gr.skip()
            if not collection or collection == NO_COLLECTION:
                return None, f"{ERROR_MARK}Choose or create a collection first, then upload.", gr.skip(), gr.skip()
            try:
                result = upload_markdown(await api.upload(collection, list(paths)))
            except ApiError as e:
                result = e.markdown()
            except httpx.HTTPError as e:
                result = f"{ERROR_MARK}upload failed: {e}"
            picker, note, _ = await self._collections(api, collection)
            return None, result, picker, note
        finally:
            for path in paths or []:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    @staticmethod
    def add_user(message: str, history: list[dict[str, Any]] | None, status: str) -> tuple[str, list[dict[str, Any]]]:
        """The message joins the chat, unless an answer is still streaming (then it stays in the box)."""
        history = list(history or [])
        if status == GENERATING:
            gr.Warning("Wait for the answer, or press Stop.")
            return message, history
        if message.strip():
            history.append({"role": "user", "content": message})
        return "", history

    async def reply(
        self, history: list[dict[str, Any]] | None, model: str | None, system: str, temperature: float, max_tokens: float | None,
        collection: str | None, top_k: float, key: str, request: gr.Request,
    ) -> AsyncIterator[tuple[list[dict[str, Any]], str, str]]:
        """Stream the assistant's answer into the chat: (history, sources, status) after each delta."""
        history = list(history or [])
        if not history or history[-1].get("role") != "user":
            yield gr.skip(), gr.skip(), gr.skip()  # nothing to answer (or another answer is streaming into the chat)
            return
        body: dict[str, Any] = {"messages": to_api_messages(history, system), "stream": True, "temperature": float(temperature),
                                "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        if max_tokens:
            body["max_tokens"] = int(max_tokens)
        if collection and collection != NO_COLLECTION:
            body["rag"] = {"collection": collection, "top_k": int(top_k)}
        sources = ""
        history.append({"role": "assistant", "content": ""})
        yield history, sources, GENERATING
        start = last = time.monotonic()
        text, usage, served = "", None, model or "default model"
        try:
            async for event in self.api(request, key).chat_stream(body):
                served = event.get("model") or served
                usage = event.get("usage") or usage
                if "sources" in event:
                    sources = sources_markdown(event["sources"] or [])
                for choice in event.get("choices") or []:
                    text += (choice.get("delta") or {}).get("content") or ""
                if time.monotonic() - last >= STREAM_UPDATE_SECONDS:
                    last = time.monotonic()
                    history[-1] = {"role": "assistant", "content": text}
                    yield history, sources, GENERATING
            status = _status(served, usage, time.monotonic() - start)
        except ApiError as e:
            text, status = (text + "\n\n" if text else "") + e.markdown(), f"error {e.status}" if e.status else "error"
        except (httpx.HTTPError, ValueError) as e:  # ValueError: an event that is not JSON
            text, status = (text + "\n\n" if text else "") + f"{ERROR_MARK}the API call failed: {e}", "error"
        history[-1] = {"role": "assistant", "content": text}
        yield history, sources, status


def build_ui(fallback_url: str) -> gr.Blocks:
    """The chat page. `fallback_url` is the server's own address, for calls whose socket address is unknown."""
    ui = ChatUI(fallback_url)
    with gr.Blocks(title="Levante chat", analytics_enabled=False, fill_height=True, delete_cache=(600, 3600)) as blocks:
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Levante", elem_id="chat", height=520, buttons=["copy"], feedback_options=None)
                with gr.Row():
                    message = gr.Textbox(placeholder="Message (Enter to send)", show_label=False, scale=6, elem_id="message")
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
                    new_chat = gr.Button("New chat", scale=1, min_width=80, elem_id="new-chat")
                status = gr.Markdown("", elem_id="status")
                sources = gr.Markdown("", elem_id="sources")
            with gr.Column(scale=1):
                key = gr.Textbox(label="API key", type="password", visible=False, elem_id="api-key",
                                 placeholder="lv-… (kept in this page only)")
                model = gr.Dropdown(label="Model", choices=[], elem_id="model")
                system = gr.Textbox(label="System prompt", lines=3, elem_id="system")
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
                max_tokens = gr.Number(512, label="Max tokens", minimum=1, precision=0, elem_id="max-tokens")
                with gr.Accordion("Documents (RAG)", open=True):
                    collection = gr.Dropdown(label="Collection", choices=[NO_COLLECTION], value=NO_COLLECTION, elem_id="collection")
                    with gr.Row():
                        refresh = gr.Button("Refresh", size="sm", elem_id="refresh-collections")
                    top_k = gr.Slider(1, 16, value=4, step=1, label="Passages per answer", elem_id="top-k")
                    rag_note = gr.Markdown("", elem_id="collections")
                    with gr.Row():
                        new_name = gr.Textbox(label="New collection", scale=3, elem_id="new-collection")
                        create = gr.Button("Create", size="sm", scale=1, elem_id="create-collection")
                    # any file type: the server says per file what it could not read
                    files = gr.File(label="Upload documents into the collection", file_count="multiple", elem_id="upload", height=140)
                    uploaded = gr.Markdown("", elem_id="upload-result")

        settings = [model, system, temperature, max_tokens, collection, top_k, key]
        replies = []
        for trigger in (send.click, message.submit):
            added = trigger(ui.add_user, [message, chatbot, status], [message, chatbot], queue=False, api_visibility="private")
            replies.append(added.then(ui.reply, [chatbot, *settings], [chatbot, sources, status],
                                      show_progress="hidden", api_visibility="private"))
        # Cancel first, then update: an update sent along with the cancel is overtaken by the reply's last one.
        stop.click(None, cancels=replies, queue=False).then(
            lambda s: "Stopped." if s == GENERATING else s, status, status, queue=False)
        for clear in (new_chat.click, chatbot.clear):
            clear(None, cancels=replies, queue=False).then(lambda: ([], "", ""), None, [chatbot, sources, status], queue=False)

        for event in (blocks.load, key.submit, key.blur):
            event(ui.load, [key, model], [key, model, status], api_visibility="private")
        for event in (blocks.load, key.submit, key.blur, refresh.click):
            event(ui.collections, [key, collection], [collection, rag_note, files, create], api_visibility="private")
        create.click(ui.create_collection, [new_name, key], [collection, rag_note, new_name], api_visibility="private")
        files.upload(ui.upload, [files, collection, key], [files, uploaded, collection, rag_note], api_visibility="private")
    # The handlers only wait on HTTP calls, so no limit of their own (Gradio's default runs each one for one user at
    # a time); the server's queue and limits apply to what they ask of it.
    blocks.queue(default_concurrency_limit=None)
    return blocks


def mount_ui(app: FastAPI, fallback_url: str, path: str = UI_PATH, max_file_size: int | None = None) -> None:
    """Serve the chat page at `path` on `app` (no web fonts or analytics are fetched from outside).

    `max_file_size`: the largest document the page accepts (checked in the browser before uploading).
    """
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    gr.mount_gradio_app(app, build_ui(fallback_url), path, theme=theme, run_history=False, footer_links=["settings"],
                        ssr_mode=False, mcp_server=False, show_error=True, max_file_size=max_file_size)

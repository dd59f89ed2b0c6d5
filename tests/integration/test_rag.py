"""RAG end to end: documents with facts no model could know, ingested by the CLI and over HTTP,
retrieved for paraphrased questions, and cited by chat completions (plain and streaming).

The corpus is built here: a 4-page PDF (fpdf2) with an invented fact per page, a Markdown file,
an HTML page, and broken files (a corrupt PDF, a password-protected PDF, an empty file, a .docx
and an .exe) that must fail one by one while the rest ingests. Three stores are exercised: the
embedded local store under LEVANTE_HOME (CLI and server), and a Qdrant server URL (the
`--qdrant-url` path, against tests/integration/qdrant_rest.py: Qdrant's REST API over
qdrant-client's in-memory engine, since no Qdrant server binary is installable here).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from qdrant_rest import QdrantRestServer

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "levante.cli"]
SERVER_ARGS = ["smollm2", "--kv-cache-memory", "512MiB", "--max-model-len", "4096"]  # as conftest.SMOLLM2_ARGS

# Page -> paragraphs. Each page has its own invented subject; page 2 holds the fact the chat must cite.
PDF_PAGES = {
    1: [
        "Quibbleton Orchard Annual Report",
        "The Quibbleton orchard grows silver pears that only ripen under a blue moon. The orchard keepers "
        "harvest exactly 317 crates of them in a good season and sell them at the Fenwary market.",
        "Irrigation at Quibbleton comes from the Dellmoor spring, which the keepers open for nine hours on "
        "every second Thursday. The spring water is rich in a mineral the locals call pellucite.",
    ],
    2: [
        "The Zorblax-7 Flux Capacitor",
        "The Zorblax-7 flux capacitor operates at 4,812 millijoules. Below that energy its trilium coil "
        "stays cold, and above it the casing starts to hum at an audible pitch.",
        "The Zorblax-7 was designed by the engineer Ambrel Vostique at the Tarnowick foundry. Its casing is "
        "painted ochre and the whole unit weighs 23 kilograms.",
    ],
    3: [
        "The Merovant Ferry",
        "The Merovant ferry crosses Lake Ildra in 42 minutes and carries at most 96 passengers. It sails "
        "from Port Saffel at dawn and returns from the far shore at dusk.",
        "Tickets for the Merovant ferry cost 14 brass tokens, and children under seven travel free when "
        "accompanied by an adult.",
    ],
    4: [
        "The Orrinvale Festival",
        "Every autumn the town of Orrinvale holds a lantern festival where 1,206 paper lanterns are released "
        "over the Kesh river. The festival was founded by the poet Lisbeth Carrow.",
    ],
}
BEACON_MD = """---
title: Glimmerhorn notes
---
# The Glimmerhorn beacon

The **Glimmerhorn** beacon on Skerry Point flashes every 7 seconds in a *violet* colour.
See [the keeper's log](https://example.org/log).

## Maintenance

Its lamp is a [sodium-argon tube](https://example.org/tube) that the keeper replaces every 300 nights.
"""
KETTLE_HTML = """<!doctype html><html><head><title>Brassvale kettle</title>
<style>body { font-family: serif }</style><script>var tracking = "brassvale analytics";</script></head>
<body><h1>The Brassvale kettle</h1>
<p>The Brassvale kettle boils a litre of water in 93 seconds and whistles in the key of F&nbsp;sharp.</p>
<p>It is forged from Cindermoor copper by the Halloway brothers.</p></body></html>"""

# Paraphrased questions and where their answer is: (file, page, words the passage must hold).
QUESTIONS = [
    ("How much energy does the Zorblax-7 need?", "zorblax.pdf", 2, "4,812 millijoules"),
    ("Which engineer came up with the Zorblax-7 device?", "zorblax.pdf", 2, "Ambrel Vostique"),
    ("How long does the boat take to get across Lake Ildra?", "zorblax.pdf", 3, "42 minutes"),
    ("What fruit is grown at Quibbleton and how many crates are picked?", "zorblax.pdf", 1, "317 crates"),
    ("How often does the lighthouse on Skerry Point blink?", "beacon.md", None, "every 7 seconds"),
    ("How quickly can the Brassvale heat water to boiling?", "kettle.html", None, "93 seconds"),
]
GOOD = {"zorblax.pdf", "beacon.md", "kettle.html", "open.pdf"}
BAD = {
    "corrupt.pdf": "not a readable PDF",
    "locked.pdf": "encrypted PDF (password-protected)",
    "empty.txt": "empty file",
    "report.docx": "unsupported file type '.docx'",
    "setup.exe": "unsupported file type '.exe'",
}


def make_pdf(pages: dict[int, list[str]]) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_auto_page_break(False)
    for paragraphs in pages.values():
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 14)
        pdf.multi_cell(0, 8, paragraphs[0], new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", size=11)
        for text in paragraphs[1:]:
            pdf.ln(5)
            pdf.multi_cell(0, 6, text, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def encrypt_pdf(data: bytes, user_password: str) -> bytes:
    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    pdf = make_pdf(PDF_PAGES)
    (folder / "zorblax.pdf").write_bytes(pdf)
    (folder / "beacon.md").write_text(BEACON_MD)
    (folder / "kettle.html").write_text(KETTLE_HTML)
    # Restricted with an owner password only: opens with the empty user password, so it ingests.
    (folder / "open.pdf").write_bytes(encrypt_pdf(make_pdf({1: ["Vault", "The Ossfield vault door opens with 6 brass keys."]}), ""))
    (folder / "corrupt.pdf").write_bytes(pdf[: len(pdf) // 3])
    (folder / "locked.pdf").write_bytes(encrypt_pdf(pdf, "hunter2"))
    (folder / "empty.txt").write_bytes(b"")
    (folder / "report.docx").write_bytes(b"PK\x03\x04" + os.urandom(256))
    (folder / "setup.exe").write_bytes(b"MZ\x90\x00" + os.urandom(256))
    return folder


def levante(home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "LEVANTE_HOME": str(home), "COLUMNS": "200", **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def check_batch(files: list[dict[str, Any]], expected_good: str = "added") -> None:
    by_name = {f["file"]: f for f in files}
    assert set(by_name) == GOOD | set(BAD), by_name
    for name in GOOD:
        assert by_name[name]["status"] == expected_good, by_name[name]
        assert by_name[name]["chunks"] >= 1 and by_name[name]["error"] is None
    assert by_name["zorblax.pdf"]["pages"] == 4
    for name, message in BAD.items():
        assert by_name[name]["status"] == "error" and message in (by_name[name]["error"] or ""), by_name[name]


def check_retrieval(search: Callable[[str], list[dict[str, Any]]], questions: list[tuple[str, str, int | None, str]] = QUESTIONS) -> None:
    for q, file, page, words in questions:
        passages = search(q)
        top = passages[0]
        assert (top["file"], top["page"]) == (file, page) and words in top["text"], f"{q!r} -> {passages[:2]}"
        assert top["score"] >= max(p["score"] for p in passages)


# ---- CLI, embedded store ----------------------------------------------------------------


def test_cli_ingest_query_list_rm(corpus: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = levante(home, "rag", "ingest", str(corpus), "--collection", "docs", "--json")
    assert first.returncode == 1, "some files failed: exit status 1"
    assert "Traceback" not in first.stderr
    check_batch(json.loads(first.stdout)["files"])

    listed = levante(home, "rag", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [docs] = json.loads(listed.stdout)
    assert docs["name"] == "docs" and docs["documents"] == len(GOOD) and docs["chunks"] >= len(GOOD) and docs["created"] > 0

    # Unchanged files are skipped; a changed one replaces its chunks. (Each CLI run loads torch and the
    # embedder, so this test asks few questions; the HTTP tests ask them all.)
    (corpus / "beacon.md").write_text(BEACON_MD.replace("every 7 seconds", "every 11 seconds"))
    try:
        again = levante(home, "rag", "ingest", str(corpus / "zorblax.pdf"), str(corpus / "beacon.md"), "--collection", "docs", "--json")
        assert again.returncode == 0, again.stderr
        assert [f["status"] for f in json.loads(again.stdout)["files"]] == ["unchanged", "replaced"]
        found = levante(home, "rag", "query", "docs", "How often does the lighthouse on Skerry Point blink?", "--top-k", "50", "--json")
        assert found.returncode == 0, found.stderr
        passages = json.loads(found.stdout)["passages"]
        assert passages[0]["file"] == "beacon.md" and "every 11 seconds" in passages[0]["text"]
        assert not any("every 7 seconds" in p["text"] for p in passages), "the old version's chunks are gone"
    finally:
        (corpus / "beacon.md").write_text(BEACON_MD)
    documents = json.loads(levante(home, "rag", "list", "docs", "--json").stdout)
    assert sorted(Path(d["path"]).name for d in documents) == sorted(GOOD)

    # The table output and the answer from the model (offline, same prompt builder as the server).
    table = levante(home, "rag", "query", "docs", "How much energy does the Zorblax-7 need?", "--top-k", "2",
                    "--answer", "--max-tokens", "48")
    assert table.returncode == 0, table.stderr
    assert "1. zorblax.pdf (page 2, chunk" in table.stdout and "4,812 millijoules" in table.stdout
    assert "answer:" in table.stdout and "sources: zorblax.pdf, page 2" in table.stdout
    if not re.search(r"4,?812", table.stdout.split("answer:")[1]):
        print("note: SmolLM2-135M did not repeat 4,812 in its answer (model quality, not asserted)")

    removed = levante(home, "rag", "rm", "docs")
    assert removed.returncode == 0 and "deleted docs" in removed.stdout
    unknown = levante(home, "rag", "rm", "docs")
    assert unknown.returncode == 1 and "collection 'docs' does not exist" in unknown.stderr and "Traceback" not in unknown.stderr


# ---- HTTP, embedded store of the shared test server --------------------------------------


def upload(url: str, collection: str, paths: list[Path]) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    return httpx.post(f"{url}/v1/rag/collections/{collection}/files", files=files, timeout=300)


def test_http_collections_upload_query(smollm2_server: Server, corpus: Path) -> None:
    url = smollm2_server.url
    created = httpx.post(f"{url}/v1/rag/collections", json={"name": "http-docs"}, timeout=60)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "http-docs" and body["documents"] == 0 and body["chunks"] == 0 and body["created"] > 0
    dup = httpx.post(f"{url}/v1/rag/collections", json={"name": "http-docs"}, timeout=60)
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "collection_exists"
    bad = httpx.post(f"{url}/v1/rag/collections", json={"name": "../Etc"}, timeout=60)
    assert bad.status_code == 400 and "invalid collection name" in bad.json()["error"]["message"]

    done = upload(url, "http-docs", sorted(corpus.iterdir()))
    assert done.status_code == 200, done.text
    assert done.json()["collection"] == "http-docs"
    check_batch(done.json()["files"])

    def search(q: str) -> list[dict[str, Any]]:
        r = httpx.post(f"{url}/v1/rag/collections/http-docs/query", json={"query": q, "top_k": 3}, timeout=60)
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"data"}
        return list(r.json()["data"])

    check_retrieval(search)
    assert set(search("kettle")[0]) == {"file", "page", "chunk", "score", "text"}

    listed = httpx.get(f"{url}/v1/rag/collections", timeout=60).json()
    assert listed["object"] == "list"
    [info] = [c for c in listed["data"] if c["name"] == "http-docs"]
    assert info["documents"] == len(GOOD) and set(info) == {"name", "documents", "chunks", "created"}

    again = upload(url, "http-docs", [corpus / "zorblax.pdf"])
    assert again.json()["files"][0]["status"] == "unchanged"
    edited = [("files", ("beacon.md", BEACON_MD.replace("every 7 seconds", "every 11 seconds").encode(), "text/markdown"))]
    replaced = httpx.post(f"{url}/v1/rag/collections/http-docs/files", files=edited, timeout=300)
    assert replaced.json()["files"][0]["status"] == "replaced"
    texts = [p["text"] for p in httpx.post(f"{url}/v1/rag/collections/http-docs/query", json={"query": "beacon", "top_k": 50}, timeout=60).json()["data"]]
    assert any("every 11 seconds" in t for t in texts) and not any("every 7 seconds" in t for t in texts)

    # Uploads may exceed the server's 8 MiB JSON limit (their own limit is larger); other RAG bodies may not.
    big = [("files", ("big.bin", b"\x00" * (9 << 20), "application/octet-stream"))]
    accepted = httpx.post(f"{url}/v1/rag/collections/http-docs/files", files=big, timeout=300)
    assert accepted.status_code == 200 and accepted.json()["files"][0]["status"] == "error"
    too_big = httpx.post(f"{url}/v1/rag/collections/http-docs/query", content=b'{"query": "' + b"x" * (9 << 20) + b'"}',
                         headers={"content-type": "application/json"}, timeout=60)
    assert too_big.status_code == 413

    missing = httpx.post(f"{url}/v1/rag/collections/nothere/query", json={"query": "x"}, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    no_files = httpx.post(f"{url}/v1/rag/collections/http-docs/files", data={"other": "x"}, timeout=60)
    assert no_files.status_code == 400


@pytest.fixture(scope="module")
def chat_collection(smollm2_server: Server, corpus: Path) -> Iterator[str]:
    name = "chat-docs"
    done = upload(smollm2_server.url, name, [corpus / n for n in sorted(GOOD)])  # created on first upload
    assert done.status_code == 200 and all(f["status"] == "added" for f in done.json()["files"]), done.text
    yield name
    httpx.delete(f"{smollm2_server.url}/v1/rag/collections/{name}", timeout=60)


def test_chat_with_rag_cites_the_pdf_page(smollm2_server: Server, chat_collection: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{smollm2_server.url}/v1", api_key="unused", timeout=300)
    question = "How much energy does the Zorblax-7 need?"
    messages: Any = [{"role": "user", "content": question}]
    grounded = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=48, temperature=0,
        extra_body={"rag": {"collection": chat_collection, "top_k": 3}},
    )
    sources = (grounded.model_extra or {})["sources"]
    assert len(sources) == 3 and set(sources[0]) == {"file", "page", "chunk", "score", "text"}
    assert (sources[0]["file"], sources[0]["page"]) == ("zorblax.pdf", 2) and "4,812 millijoules" in sources[0]["text"]
    assert [s["score"] for s in sources] == sorted((s["score"] for s in sources), reverse=True)

    # Server-side: the passages went into the prompt (the server logs what it built; usage agrees).
    plain = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=1, temperature=0)
    assert plain.usage is not None and grounded.usage is not None
    assert "sources" not in (plain.model_extra or {})
    logged = re.findall(rf"rag: 3 passages of '{chat_collection}' retrieved, 3 used; prompt (\d+) tokens", smollm2_server.log_text())
    assert logged and int(logged[-1]) == grounded.usage.prompt_tokens
    assert grounded.usage.prompt_tokens > plain.usage.prompt_tokens + sum(len(s["text"].split()) for s in sources)
    answer = grounded.choices[0].message.content or ""
    if not re.search(r"4,?812", answer):
        print(f"note: SmolLM2-135M's answer does not mention 4,812 (model quality, not asserted): {answer!r}")


def test_streaming_chat_sends_sources_before_text(smollm2_server: Server, chat_collection: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{smollm2_server.url}/v1", api_key="unused", timeout=300)
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Who designed the Zorblax-7?"}], max_tokens=16, temperature=0,
        stream=True, extra_body={"rag": {"collection": chat_collection, "top_k": 2}},
    )
    chunks = list(stream)
    first = chunks[0]
    assert first.choices == [] and first.object == "chat.completion.chunk"
    sources = (first.model_extra or {})["sources"]
    assert (sources[0]["file"], sources[0]["page"]) == ("zorblax.pdf", 2) and "Ambrel Vostique" in sources[0]["text"]
    assert chunks[1].choices[0].delta.role == "assistant"
    assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[1:] if c.choices)


def test_chat_rag_fits_the_context_window_and_reports_errors(smollm2_server: Server, chat_collection: str) -> None:
    url = smollm2_server.url
    question = [{"role": "user", "content": "How much energy does the Zorblax-7 need?"}]
    # A reply budget that leaves room for about one passage: the lowest-scored ones are dropped.
    # (Streamed and closed after the sources: the generation itself is not what is tested.)
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, json={
        "messages": question, "max_tokens": 4096 - 260, "stream": True, "rag": {"collection": chat_collection, "top_k": 6},
    }) as r:
        assert r.status_code == 200
        line = next(x for x in r.iter_lines() if x.startswith("data: "))
    sources = json.loads(line[len("data: "):])["sources"]
    assert 1 <= len(sources) < 6 and sources[0]["page"] == 2
    prompt = int(re.findall(rf"rag: 6 passages of '{chat_collection}' retrieved, {len(sources)} used; prompt (\d+) tokens",
                            smollm2_server.log_text())[-1])
    assert prompt + 4096 - 260 <= 4096

    missing = httpx.post(f"{url}/v1/chat/completions", json={"messages": question, "max_tokens": 4, "rag": {"collection": "nothere"}}, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "rag.collection"
    bad = httpx.post(f"{url}/v1/chat/completions", json={"messages": question, "max_tokens": 4, "rag": {"collection": "No Such"}}, timeout=60)
    assert bad.status_code == 400
    no_user = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                         json={"messages": [{"role": "system", "content": "x"}], "max_tokens": 4, "rag": {"collection": chat_collection}})
    assert no_user.status_code == 400 and "user message" in no_user.json()["error"]["message"]


def test_cli_on_a_home_the_server_holds_says_what_to_do(smollm2_server: Server, chat_collection: str) -> None:
    done = levante(smollm2_server.home, "rag", "list")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "open in another process" in done.stderr and "/v1/rag/" in done.stderr and "--qdrant-url" in done.stderr


def test_delete_collection(smollm2_server: Server, corpus: Path) -> None:
    url = smollm2_server.url
    assert upload(url, "to-delete", [corpus / "kettle.html"]).status_code == 200
    gone = httpx.delete(f"{url}/v1/rag/collections/to-delete", timeout=60)
    assert gone.status_code == 200 and gone.json() == {"name": "to-delete", "deleted": True}
    assert httpx.delete(f"{url}/v1/rag/collections/to-delete", timeout=60).status_code == 404
    assert "to-delete" not in [c["name"] for c in httpx.get(f"{url}/v1/rag/collections", timeout=60).json()["data"]]


# ---- a Qdrant server URL (--qdrant-url) ---------------------------------------------------


@pytest.fixture(scope="module")
def qdrant() -> Iterator[QdrantRestServer]:
    server = QdrantRestServer(api_key="qdrant-test-key").start()
    yield server
    server.stop()


def test_qdrant_server_shared_by_cli_and_server(server_factory: Callable[..., Server], qdrant: QdrantRestServer, corpus: Path) -> None:
    env = {"QDRANT_API_KEY": "qdrant-test-key"}
    server = server_factory([*SERVER_ARGS, "--qdrant-url", qdrant.url], env=env)
    # The CLI ingests while the server runs: with a Qdrant server there is no single-process lock.
    cli_home = server.home.parent / "cli-home"
    ingested = levante(cli_home, "rag", "ingest", str(corpus), "--collection", "remote", "--qdrant-url", qdrant.url, "--json", env=env)
    check_batch(json.loads(ingested.stdout)["files"])
    assert ("remote", "doc_id", "keyword") in qdrant.indexes  # a server gets payload indexes for the filters we use

    url = server.url
    listed = httpx.get(f"{url}/v1/rag/collections", timeout=60).json()["data"]
    assert [(c["name"], c["documents"]) for c in listed] == [("remote", len(GOOD))]

    def search(q: str) -> list[dict[str, Any]]:
        r = httpx.post(f"{url}/v1/rag/collections/remote/query", json={"query": q, "top_k": 3}, timeout=60)
        assert r.status_code == 200, r.text
        return list(r.json()["data"])

    check_retrieval(search)
    # An upload is known by its file name, a CLI file by its path: the same file uploaded is another document.
    assert upload(url, "remote", [corpus / "beacon.md"]).json()["files"][0]["status"] == "added"
    assert upload(url, "remote", [corpus / "beacon.md"]).json()["files"][0]["status"] == "unchanged"

    chat = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": "How much energy does the Zorblax-7 need?"}], "max_tokens": 8,
        "rag": {"collection": "remote", "top_k": 2},
    })
    assert chat.status_code == 200 and (chat.json()["sources"][0]["file"], chat.json()["sources"][0]["page"]) == ("zorblax.pdf", 2)
    assert not (server.home / "qdrant").exists() and not (cli_home / "qdrant").exists(), "nothing stored locally"
    assert ("POST", "/collections/remote/points/query") in qdrant.requests

    wrong_key = levante(cli_home, "rag", "list", "--qdrant-url", qdrant.url, env={"QDRANT_API_KEY": "wrong"})
    assert wrong_key.returncode == 1 and "answered 401" in wrong_key.stderr

    qdrant.stop()  # the store goes away: a clear 503, not a 500
    down = httpx.get(f"{url}/v1/rag/collections", timeout=60)
    assert down.status_code == 503 and "cannot reach Qdrant" in down.json()["error"]["message"]

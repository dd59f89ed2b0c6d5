"""`levante rag ...`: ingest documents into collections, list and remove them, query them (and answer from them)."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from levante.loaders.loader import DEFAULT_MODEL

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from levante.rag.ingest import FileResult
    from levante.rag.retrieve import Passage
    from levante.rag.service import RagService

rag_app = typer.Typer(help="Ground answers in your documents: collections of PDF, Markdown, HTML and text files in Qdrant.", no_args_is_help=True)

QDRANT_URL = typer.Option(
    None, "--qdrant-url", envvar="LEVANTE_QDRANT_URL",
    help="A Qdrant server (http://host:6333); default: embedded store in $LEVANTE_HOME/qdrant.",
)
QDRANT_API_KEY = typer.Option(None, "--qdrant-api-key", envvar="QDRANT_API_KEY", help="API key of the Qdrant server.")


@contextlib.contextmanager
def _service(qdrant_url: str | None, qdrant_api_key: str | None, **config: Any) -> Iterator[RagService]:
    """The service, with store and user errors turned into a message and exit status 1."""
    from levante.rag.service import RagConfig, RagService
    from levante.rag.vectorstore import CollectionExistsError, CollectionNotFoundError, VectorStoreError

    _quiet_libraries()
    service: RagService | None = None
    try:
        service = RagService(RagConfig(qdrant_url=qdrant_url, qdrant_api_key=qdrant_api_key, **config))
        yield service
    except (ValueError, VectorStoreError, CollectionNotFoundError, CollectionExistsError, OSError) as e:
        message = e.args[0] if isinstance(e, LookupError) and e.args else str(e)
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        if service is not None:
            service.close()


def _quiet_libraries() -> None:
    """Per-file errors are reported in our table: pypdf's warnings and the embedder's loading bar are noise here."""
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):  # transformers asks huggingface_hub whether bars are on
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


class _Bars:
    """Rich progress bars: files done, and chunks embedded of the current file."""

    def __init__(self, progress: Progress, total_files: int) -> None:
        self.progress = progress
        self.files: TaskID = progress.add_task("files", total=total_files)
        self.chunks: TaskID = progress.add_task("chunks", total=None, visible=False)

    def file_started(self, name: str) -> None:
        self.progress.update(self.files, description=f"files ({name})")
        self.progress.reset(self.chunks, total=None, visible=False, description=f"embedding {name}")

    def chunks_total(self, total: int) -> None:
        self.progress.reset(self.chunks, total=total, visible=True)

    def chunks_embedded(self, count: int) -> None:
        self.progress.advance(self.chunks, count)

    def file_done(self, result: FileResult) -> None:
        self.progress.advance(self.files)


@rag_app.command("ingest")
def ingest(
    paths: list[Path] = typer.Argument(..., help="Files and folders (folders are searched recursively)."),
    collection: str = typer.Option(..., "--collection", "-c", help="Collection to add them to (created if missing)."),
    chunk_tokens: int = typer.Option(200, "--chunk-tokens", min=8, max=254, help="Chunk size in word pieces of the embedder."),
    overlap_tokens: int = typer.Option(40, "--overlap-tokens", min=0, help="Tokens carried over from one chunk to the next."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    qdrant_url: str | None = QDRANT_URL,
    qdrant_api_key: str | None = QDRANT_API_KEY,
) -> None:
    """Add PDF, Markdown, HTML and text files to a collection: changed files are replaced, unchanged ones skipped.

    Exit status 1 when any file could not be ingested (the others are ingested all the same).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from levante.rag.ingest import collect_sources

    with _service(qdrant_url, qdrant_api_key, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens) as service:
        sources = collect_sources(paths)
        if not sources:
            raise ValueError("no files found in " + ", ".join(map(str, paths)))
        console = Console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True, disable=as_json or not console.is_terminal) as progress:
            results = service.ingest(collection, sources, _Bars(progress, len(sources)))
    if as_json:
        typer.echo(json.dumps({"collection": collection, "files": [_result_json(r) for r in results]}, indent=2))
    else:
        _print_results(collection, results)
    if any(r.status == "error" for r in results):
        raise typer.Exit(1)


def _result_json(r: FileResult) -> dict[str, Any]:
    return {"file": r.file, "path": r.path, "status": r.status, "chunks": r.chunks, "pages": r.pages, "error": r.error}


def _print_results(collection: str, results: list[FileResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("FILE", "STATUS", "PAGES", "CHUNKS", "ERROR")
    colour = {"added": "green", "replaced": "yellow", "unchanged": "dim", "error": "red"}
    for r in results:
        table.add_row(r.path or r.file, f"[{colour[r.status]}]{r.status}[/]", str(r.pages or ""), str(r.chunks or ""), r.error or "")
    console = Console(width=160)
    console.print(table)
    counts = {s: sum(r.status == s for r in results) for s in colour}
    console.print(f"{collection}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))


@rag_app.command("list")
def list_(
    name: str | None = typer.Argument(None, help="A collection: list its documents instead."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    qdrant_url: str | None = QDRANT_URL,
    qdrant_api_key: str | None = QDRANT_API_KEY,
) -> None:
    """List collections (documents, chunks, created), or the documents of one."""
    from rich.console import Console
    from rich.table import Table

    with _service(qdrant_url, qdrant_api_key) as service:
        if name is not None:
            docs = service.documents(name)
            if as_json:
                typer.echo(json.dumps(docs, indent=2))
                return
            table = Table("FILE", "PAGES", "CHUNKS", "INGESTED", "SHA256")
            for d in docs:
                table.add_row(str(d.get("path")), str(d.get("pages")), str(d.get("chunks")), _when(int(d.get("ingested_at", 0))),
                              str(d.get("content_hash", ""))[:12])
            Console(width=160).print(table)
            return
        infos = service.collections()
    if as_json:
        typer.echo(json.dumps([{"name": c.name, "documents": c.documents, "chunks": c.chunks, "created": c.created} for c in infos], indent=2))
        return
    table = Table("NAME", "DOCUMENTS", "CHUNKS", "CREATED")
    for c in infos:
        table.add_row(c.name, str(c.documents), str(c.chunks), _when(c.created))
    Console(width=160).print(table)


def _when(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else ""


@rag_app.command("rm")
def rm(
    names: list[str] = typer.Argument(..., help="Collections to delete."),
    qdrant_url: str | None = QDRANT_URL,
    qdrant_api_key: str | None = QDRANT_API_KEY,
) -> None:
    """Delete collections and everything ingested into them."""
    with _service(qdrant_url, qdrant_api_key) as service:
        for name in names:
            service.delete(name)
            typer.echo(f"deleted {name}")


@rag_app.command("query")
def query(
    name: str = typer.Argument(..., help="The collection."),
    question: str = typer.Argument(..., help="What to look for."),
    top_k: int = typer.Option(4, "--top-k", "-k", min=1, max=100, help="Passages to retrieve."),
    answer: bool = typer.Option(False, "--answer", help="Also have the model answer from the passages."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model for --answer: registry name, GGUF file, HF folder."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Answer length limit (--answer)."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: {passages, answer}."),
    qdrant_url: str | None = QDRANT_URL,
    qdrant_api_key: str | None = QDRANT_API_KEY,
) -> None:
    """Print the passages of NAME nearest to QUESTION with their source, page and score; --answer adds the model's answer."""
    with _service(qdrant_url, qdrant_api_key) as service:  # closed before the model loads: the store is free meanwhile
        passages = service.query(name, question, top_k)
    if not as_json:
        _print_passages(passages)
    reply: str | None = None
    used: list[Passage] = passages
    if answer:
        try:
            reply, used = _answer(model, question, passages, max_tokens, temperature, stream=not as_json)
        except (ValueError, OSError) as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"passages": [p.source() for p in passages], "answer": reply,
                               "sources": [p.source() for p in used] if answer else None}, indent=2))


def _print_passages(passages: list[Passage]) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(width=160, highlight=False)
    if not passages:
        console.print("no passages (is the collection empty?)")
    for i, p in enumerate(passages, 1):
        where = f"page {p.page}, " if p.page is not None else ""
        console.print(f"[bold]{i}. {escape(p.file)}[/bold] ({where}chunk {p.chunk}, score {p.score:.3f})")
        console.print("   " + escape(p.text).replace("\n", "\n   "))
        console.print()


def _answer(model: str, question: str, passages: list[Passage], max_tokens: int, temperature: float, stream: bool) -> tuple[str, list[Passage]]:
    """The model's answer from the passages, built with the server's prompt builder; streamed to stdout unless JSON."""
    from levante.llm import LLM
    from levante.rag.retrieve import grounded_prompt
    from levante.sampling_params import SamplingParams

    llm = LLM(model, kv_cache_memory=512 << 20)
    messages: list[Any] = [{"role": "user", "content": question}]
    ids, used = grounded_prompt(messages, passages, llm.encode_chat, llm.engine.max_model_len, max_tokens)
    llm.engine.add_request("rag", {"prompt_token_ids": ids}, SamplingParams(max_tokens=max_tokens, temperature=temperature))
    parts: list[str] = []
    if stream:
        typer.secho("answer:", bold=True)
    for out in llm.stream_steps({"rag"}):
        for delta in out.outputs:
            parts.append(delta.text)
            if stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
    if stream:
        sys.stdout.write("\n")
        if used:
            typer.echo("sources: " + "; ".join(p.label for p in used))
    return "".join(parts), used

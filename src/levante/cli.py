"""The `levante` command."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from levante.loaders.loader import DEFAULT_MODEL

if TYPE_CHECKING:
    from levante.llm import LLM
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
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Generate text from MODEL and stream it to stdout."""
    from levante.llm import LLM
    from levante.sampling_params import SamplingParams

    with user_errors():
        llm = LLM(model, dtype=dtype, device=device)
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
    device: str | None = typer.Option(None, "--device"),
    max_model_len: int | None = typer.Option(None, "--max-model-len", min=16),
    kv_cache_memory: str | None = typer.Option(None, "--kv-cache-memory", help="KV-cache budget, e.g. 2GiB, 512MiB (default: a fraction of free memory)."),
    kv_cache_fraction: float | None = typer.Option(None, "--kv-cache-fraction", min=0.01, max=0.95),
    max_num_seqs: int | None = typer.Option(None, "--max-num-seqs", min=1),
    max_num_batched_tokens: int | None = typer.Option(None, "--max-num-batched-tokens", min=16),
    max_waiting: int | None = typer.Option(None, "--max-waiting", min=1, help="Queued requests beyond which new ones get 503."),
    log_level: str | None = typer.Option(None, "--log-level"),
) -> None:
    """Serve models over HTTP: OpenAI, TGI, Truss (/predict), Ray Serve (/infer) and Ollama APIs."""
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
            "device": device,
            "max_model_len": max_model_len,
            "kv_cache_memory": parse_size(kv_cache_memory) if kv_cache_memory else None,
            "kv_cache_fraction": kv_cache_fraction,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "max_waiting": max_waiting,
            "log_level": log_level,
        }
        values.update({k: v for k, v in cli.items() if v is not None})
        opts = ServeOptions(**values)  # type: ignore[arg-type]
        logging.getLogger("levante").setLevel(opts.log_level.upper())
        run(opts)


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
def version() -> None:
    """Print the version."""
    from levante import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()

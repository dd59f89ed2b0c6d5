"""The `levante` command."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
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


@app.command()
def version() -> None:
    """Print the version."""
    from levante import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()

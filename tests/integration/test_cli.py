"""The `levante` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from levante import LLM, SamplingParams


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "levante.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_streams_the_same_text_as_the_api(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("mistral")
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64)
    expected = llm.generate("The sea", SamplingParams(temperature=0, max_tokens=8, ignore_eos=False))[0].outputs[0].text
    chat = llm.chat([{"role": "user", "content": "The sea"}], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    raw = run_cli("generate", str(path), "The sea", "--max-tokens", "8", "--raw", "--dtype", "float32")
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == expected + "\n"
    chatted = run_cli("generate", str(path), "The sea", "--max-tokens", "8", "--dtype", "float32")
    assert chatted.returncode == 0, chatted.stderr
    assert chatted.stdout == chat + "\n"


def test_generate_reports_a_bad_model_path_clearly(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}')
    out = run_cli("generate", str(tmp_path), "hi")
    assert out.returncode != 0
    assert "pickle" in out.stderr and "Traceback" not in out.stderr
    missing = run_cli("generate", str(tmp_path / "nope.gguf"), "hi")
    assert missing.returncode != 0 and "no model at" in missing.stderr and "Traceback" not in missing.stderr

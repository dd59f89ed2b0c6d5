"""`levante run NAME`: a terminal chat, as `ollama run` gives one.

Type a message and press Enter; the reply streams. Start and end a multi-line message
with three double quotes. Commands: /system TEXT, /clear, /bye (or Ctrl-D), /help.
Ctrl-C stops a reply mid-stream and keeps the conversation.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable
from typing import TextIO

from levante.llm import LLM
from levante.loaders.chat_template import Message
from levante.sampling_params import SamplingParams

HELP = """Commands:
  /system TEXT   set the system prompt (clears nothing else)
  /clear         forget the conversation
  /bye           leave (Ctrl-D works too)
  \"\"\"            start or end a multi-line message
"""


class ChatSession:
    def __init__(self, llm: LLM, params: SamplingParams, out: TextIO = sys.stdout) -> None:
        self.llm = llm
        self.params = params
        self.out = out
        self.system: str | None = None
        self.history: list[Message] = []
        self._ids = itertools.count()

    def messages(self, user: str) -> list[Message]:
        system: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": user}]

    def reply(self, user: str) -> str:
        """Stream the model's answer to `user`; on Ctrl-C keep what was said so far."""
        ids = self.llm.encode_chat(self.messages(user))
        request_id = f"run-{next(self._ids)}"
        self.llm.engine.add_request(request_id, {"prompt_token_ids": ids}, self.params)
        text = ""
        try:
            for out in self.llm.stream_steps({request_id}):
                delta = out.outputs[0].text if out.outputs else ""
                text += delta
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        self.out.write("\n\n")
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return text

    def handle(self, line: str) -> bool:
        """Act on one input (a message or a command); False when the session should end."""
        stripped = line.strip()
        if not stripped:
            return True
        if stripped in ("/bye", "/exit", "/quit"):
            return False
        if stripped in ("/help", "/?"):
            self.out.write(HELP)
        elif stripped == "/clear":
            self.history = []
            self.out.write("Cleared the conversation.\n")
        elif stripped.startswith("/system"):
            self.system = stripped[len("/system") :].strip() or None
            self.out.write("Set the system prompt.\n" if self.system else "Removed the system prompt.\n")
        elif stripped.startswith("/"):
            self.out.write(f"Unknown command {stripped.split()[0]!r}; /help lists them.\n")
        else:
            self.reply(line.strip())
        return True


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line, or every line between two lines of three double quotes."""
    first = read(">>> ")
    if not first.strip().startswith('"""'):
        return first
    lines = [first.strip()[3:]]
    if lines[0].endswith('"""'):
        return lines[0][:-3]
    while True:
        line = read("... ")
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def run(session: ChatSession, read: Callable[[str], str] = input) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    session.out.write('Chatting. /help for commands, """ for multi-line, /bye to leave.\n')
    while True:
        try:
            message = read_message(read)
        except EOFError:
            session.out.write("\n")
            return
        except KeyboardInterrupt:
            session.out.write("\n(Ctrl-D or /bye to leave)\n")
            continue
        if not session.handle(message):
            return

"""Chat messages -> prompt token ids.

Two formats:

* `JinjaChatFormat` renders the model's own chat template the way transformers'
  ``apply_chat_template`` does (same Jinja settings, globals and variables) inside an immutable
  sandbox, then encodes the text with special-token strings recognised.
* `MistralInstructFormat` builds Mistral's ``[INST]`` prompts token by token, as mistral-common
  does, so Mistral and Mixtral instruct models see exactly the prompts they were trained on.

`load_chat_format` picks between them (see its docstring for the rule).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from levante.loaders.tokenizer import MISTRAL_MODEL_TYPES, Tokenizer

Message = Mapping[str, Any]
MistralVersion = Literal["v1", "v2", "v3"]

# sha256 of the first 32000 pieces of Mistral's v1 SentencePiece vocabulary (Mistral 7B
# v0.1/v0.2, Mixtral 8x7B), joined by newlines. That vocabulary has no [INST] control token, so
# this is the only way to recognise it; HF, GGUF and tokenizer.model copies all spell the same pieces.
_MISTRAL_V1_VOCAB_SHA256 = "9667493c598ed599f14df3157cb9a6f373d49a1b2d99d98c79e937ff490d219b"
_MISTRAL_V1_VOCAB_SIZE = 32000

_ROLES = frozenset({"system", "user", "assistant", "tool"})
# Which role may follow which: mistral-common's validator, which every Mistral prompt must pass.
_MISTRAL_NEXT_ROLES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "system": frozenset({"system", "user", "assistant"}),
        "user": frozenset({"system", "user", "assistant"}),
        "assistant": frozenset({"user", "assistant", "tool"}),
        "tool": frozenset({"user", "assistant", "tool"}),
    }
)


class ChatTemplateError(ValueError):
    """A chat template is broken or unsafe, or a message list cannot be formatted."""


class ChatFormat(ABC):
    """Turns a conversation into the prompt a chat model expects."""

    @abstractmethod
    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids, BOS included when the format has one."""

    @abstractmethod
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt as human-readable text, special tokens spelled out."""


def message_text(message: Message, joiner: str = "\n") -> str:
    """A message's content as one string: OpenAI content lists have their text parts joined."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type", "text") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatTemplateError(f"only text content is supported, got a {kind!r} part")
            texts.append(str(part.get("text") or ""))
        return joiner.join(texts)
    raise ChatTemplateError(
        f"message content must be a string or a list of parts, got {type(content).__name__}"
    )


# --------------------------------------------------------------------------- Jinja templates


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, made to fail loudly.

    Jinja's sandbox answers an unsafe attribute (``''.__class__``) with an Undefined that renders
    as an empty string, so a probing template would quietly render. Raising instead turns every
    escape attempt into a ChatTemplateError.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body.

    transformers uses the tag to mark assistant text for training masks; templates that carry it
    must still parse here.
    """

    tags = {"generation"}  # noqa: RUF012 - Jinja's Extension declares it a plain set

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes <, > and &, which would change prompts; HF's does not.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _plain(value: Any) -> Any:
    """Rebuild template input from plain JSON types.

    The sandbox vets attribute access by type; arbitrary objects (pydantic models, enums) can carry
    methods it does not know are dangerous, so the template only ever sees builtins.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


class JinjaChatFormat(ChatFormat):
    """A model's own Jinja chat template, rendered with transformers' semantics.

    Messages lose their None-valued keys (as in transformers) and their content lists are joined
    into strings with newlines between text parts (as vLLM does), since most templates expect
    ``message['content']`` to be a string. Template variables: ``messages``,
    ``add_generation_prompt``, ``bos_token``, ``eos_token`` (from the arguments or the tokenizer),
    ``tools`` and ``documents`` (None).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template does not parse: {exc} (line {exc.lineno})") from exc
        self._variables: dict[str, str] = {}
        for name, text, token_id in (
            ("bos_token", bos_token, tokenizer.bos_token_id),
            ("eos_token", eos_token, tokenizer.eos_token_id),
        ):
            if text is None and token_id is not None:
                text = tokenizer.id_to_piece(token_id)
            if text is not None:
                self._variables[name] = text

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise ChatTemplateError(f"a message must be a mapping, got {type(message).__name__}")
            plain = {k: _plain(v) for k, v in message.items() if v is not None}
            if "content" in plain:
                plain["content"] = message_text(message)
            chat.append(plain)
        try:
            return str(
                self._template.render(
                    messages=chat,
                    add_generation_prompt=add_generation_prompt,
                    tools=None,
                    documents=None,
                    **self._variables,
                )
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # the template is untrusted code: any failure is the template's
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        # The template writes BOS and the control tokens itself, so encode them from their strings.
        return self._tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=False)


# --------------------------------------------------------------------------- Mistral instruct


@dataclass(frozen=True)
class _Turn:
    role: str
    text: str
    prefix: bool = False


class MistralInstructFormat(ChatFormat):
    """Mistral's instruct prompt, built token by token to match mistral-common.

    * ``v1`` (Mistral 7B v0.1/v0.2, Mixtral 8x7B): ``<s>`` then each user turn encoded as the text
      ``"[INST] {content} [/INST]"``; the system prompt opens the *first* user turn.
    * ``v2``/``v3`` (Mistral 7B v0.3, Mixtral 8x22B): ``[INST]``/``[/INST]`` are control tokens
      around the encoded content; the system prompt opens the *last* user turn. The two versions
      differ only in how tool calls are encoded, which this format does not support.

    Each assistant turn is its encoded content (v2+: trailing spaces dropped) followed by ``</s>``,
    except a final assistant message with ``"prefix": True``, which the model continues.
    System messages are joined by blank lines; consecutive messages of one role are merged with a
    blank line between them; a conversation that opens with an assistant gets an empty user turn.
    """

    def __init__(self, tokenizer: Tokenizer, version: MistralVersion = "v3") -> None:
        if version not in ("v1", "v2", "v3"):
            raise ChatTemplateError(f"unknown Mistral instruct version {version!r} (expected v1, v2 or v3)")
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ChatTemplateError("Mistral instruct format needs a tokenizer with BOS and EOS tokens")
        self._tokenizer = tokenizer
        self._bos: int = tokenizer.bos_token_id
        self._eos: int = tokenizer.eos_token_id
        self._version = version
        self._inst: tuple[int, int] | None = None
        if version != "v1":
            begin, end = _control_id(tokenizer, "[INST]"), _control_id(tokenizer, "[/INST]")
            if begin is None or end is None:
                raise ChatTemplateError(
                    f"Mistral {version} needs [INST]/[/INST] control tokens; this vocabulary is v1"
                )
            self._inst = (begin, end)

    @property
    def version(self) -> MistralVersion:
        return self._version

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        system, turns = _mistral_turns(messages, add_generation_prompt)
        users = [i for i, turn in enumerate(turns) if turn.role == "user"]
        # v1 puts the system prompt in the first user turn, later versions in the last.
        system_at = users[0] if self._version == "v1" else users[-1]
        ids = [self._bos]
        for index, turn in enumerate(turns):
            text = turn.text
            if turn.role == "user":
                if system and index == system_at:
                    text = f"{system}\n\n{text}"
                ids.extend(self._user(text))
            else:
                ids.extend(self._text(text if self._version == "v1" else text.rstrip(" ")))
                if not turn.prefix:
                    ids.append(self._eos)
        return ids

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self._tokenizer.decode(self.encode(messages, add_generation_prompt), skip_special_tokens=False)

    def _user(self, text: str) -> list[int]:
        if self._inst is None:
            return self._text(f"[INST] {text} [/INST]")
        begin, end = self._inst
        return [begin, *self._text(text), end]

    def _text(self, text: str) -> list[int]:
        # Message text never becomes control tokens: a user typing "[INST]" gets plain text.
        return self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def _mistral_turns(messages: Sequence[Message], add_generation_prompt: bool) -> tuple[str, list[_Turn]]:
    """Validate like mistral-common, then pull out the system prompt and merge same-role runs."""
    roles = _mistral_roles(messages, add_generation_prompt)
    system_parts = [message_text(m, "\n\n") for m, r in zip(messages, roles, strict=True) if r == "system"]
    turns: list[_Turn] = []
    previous = None
    for message, role in zip(messages, roles, strict=True):
        text = message_text(message, "\n\n")
        if role == "assistant" and not text:
            raise ChatTemplateError(
                "an assistant message needs non-empty content (tool calls are not supported)"
            )
        if role != "system":
            prefix = role == "assistant" and bool(message.get("prefix"))
            if role == previous and turns:
                merged = "\n\n".join(t for t in (turns[-1].text, text) if t)
                turns[-1] = _Turn(role, merged, turns[-1].prefix or prefix)
            else:
                turns.append(_Turn(role, text, prefix))
        previous = role
    if not turns or turns[0].role != "user":
        turns.insert(0, _Turn("user", ""))
    return "\n\n".join(p for p in system_parts if p), turns


def _mistral_roles(messages: Sequence[Message], add_generation_prompt: bool) -> list[str]:
    if not messages:
        raise ChatTemplateError("the conversation has no messages")
    roles = []
    for message in messages:
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in _ROLES:
            raise ChatTemplateError(f"unknown message role {role!r} (expected system, user or assistant)")
        if role == "tool" or (isinstance(message, Mapping) and message.get("tool_calls")):
            raise ChatTemplateError(
                "tool calls and tool messages are not supported by the Mistral instruct format"
            )
        roles.append(str(role))
    for before, after in itertools.pairwise(roles):
        if after not in _MISTRAL_NEXT_ROLES[before]:
            raise ChatTemplateError(
                f"a {after!r} message cannot follow a {before!r} message in a Mistral conversation"
            )
    if len(roles) == 1 and roles[0] not in ("user", "system"):
        raise ChatTemplateError("a Mistral conversation must start with a user or system message")
    last = messages[-1]
    if roles[-1] == "assistant" and add_generation_prompt and len(roles) > 1 and not last.get("prefix"):
        raise ChatTemplateError(
            "the conversation ends with an assistant message; end with a user message to get a reply, "
            'or mark the assistant message "prefix": true to continue it'
        )
    if any(m.get("prefix") for m in messages[:-1]):
        raise ChatTemplateError('only the last message may be an assistant "prefix"')
    return roles


def _control_id(tokenizer: Tokenizer, piece: str) -> int | None:
    token_id = tokenizer.token_to_id(piece)
    return token_id if token_id is not None and tokenizer.is_special(token_id) else None


def mistral_version(tokenizer: Tokenizer) -> MistralVersion | None:
    """The Mistral instruct version a vocabulary was made for, or None if it is not Mistral's.

    ``[INST]`` as a control token means v2/v3 (answered as "v3": same prompts without tools),
    unless ``[SYSTEM_PROMPT]`` is one too (v7+, which this module does not build). A vocabulary
    whose first 32000 pieces are exactly Mistral's v1 pieces is v1.
    """
    if _control_id(tokenizer, "[INST]") is not None:
        return None if _control_id(tokenizer, "[SYSTEM_PROMPT]") is not None else "v3"
    if tokenizer.vocab_size < _MISTRAL_V1_VOCAB_SIZE:
        return None
    try:
        pieces = "\n".join(tokenizer.id_to_piece(i) for i in range(_MISTRAL_V1_VOCAB_SIZE))
    except ValueError:  # a vocabulary with holes is not Mistral's
        return None
    return "v1" if hashlib.sha256(pieces.encode("utf-8")).hexdigest() == _MISTRAL_V1_VOCAB_SHA256 else None


def load_chat_format(
    tokenizer: Tokenizer,
    template: str | None,
    *,
    model_type: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> ChatFormat:
    """Choose how a model's conversations become prompts.

    Rule: the model is Mistral-family when its vocabulary is one of Mistral's (``[INST]`` control
    token, or exactly the v1 pieces; see `mistral_version`) or ``model_type`` is mistral/mixtral.
    A Mistral-family model whose template is absent or an ``[INST]`` template gets
    `MistralInstructFormat` (v1 when the vocabulary has no ``[INST]`` control token), because
    mistral-common, not the HF template, is the reference for those prompts. Every other model
    with a template gets `JinjaChatFormat`; fine-tunes of Mistral with their own format
    (Zephyr, ChatML) therefore keep it. A model with no template and no Mistral vocabulary raises
    ChatTemplateError: guessing a format would silently produce prompts the model was never
    trained on, and transformers refuses in the same case.
    """
    version = mistral_version(tokenizer)
    has_inst_token = _control_id(tokenizer, "[INST]") is not None
    if version is None and (model_type or "").lower() in MISTRAL_MODEL_TYPES and not has_inst_token:
        version = "v1"
    if version is not None and (template is None or "[INST]" in template):
        return MistralInstructFormat(tokenizer, version)
    if template is None:
        raise ChatTemplateError("model has no chat template (and is not a Mistral instruct model)")
    return JinjaChatFormat(tokenizer, template, bos_token=bos_token, eos_token=eos_token)


def read_chat_template(model_dir: str | Path) -> str | None:
    """The chat template a HF model folder ships, or None.

    Looked up as transformers does, newest convention first: ``chat_template.jinja``, then
    ``chat_template.json`` (``{"chat_template": ...}``), then ``tokenizer_config.json``'s
    ``chat_template``, which may be a list of ``{name, template}`` (the one named "default" is used).
    """
    root = Path(model_dir)
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatTemplateError(f"{jinja_file}: cannot read ({exc})") from exc
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = root / name
        if path.is_file():
            template = _template_from(_read_object(path), path)
            if template is not None:
                return template
    return None


def _read_object(path: Path) -> Mapping[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatTemplateError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path}: expected a JSON object")
    return data


def _template_from(config: Mapping[str, Any], path: Path) -> str | None:
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {e.get("name"): e.get("template") for e in value if isinstance(e, Mapping)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    raise ChatTemplateError(f"{path}: chat_template must be a string or a list of {{name, template}}")

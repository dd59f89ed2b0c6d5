"""Tokenizers for HF model folders, SentencePiece files and GGUF metadata.

Two engines sit behind one `Tokenizer` interface:

* `TokenizersTokenizer` wraps a HF `tokenizers.Tokenizer`: a folder's ``tokenizer.json``, or a
  byte-level BPE rebuilt from a GGUF file's ``gpt2`` vocabulary.
* `SentencePieceTokenizer` wraps a `sentencepiece.SentencePieceProcessor`: a ``tokenizer.model``
  file (Mistral ``.v1``/``.v3`` included), or a SentencePiece BPE model rebuilt from a GGUF file's
  ``llama`` vocabulary, so those vocabularies tokenise exactly as SentencePiece and mistral-common do.

Special tokens in text. ``encode(text)`` turns the strings of special tokens (``<|im_start|>``,
``<s>``, ``[INST]``) into their ids, as HF and llama.cpp do for prompts and rendered chat templates.
``encode(text, split_special_tokens=True)`` treats them as plain text instead, which is what
mistral-common does with message contents and what keeps a user from forging a control token.

Decoding is a pure function of the ids: ``decode(ids[a:])`` always decodes the same way, an
incomplete UTF-8 sequence at either end shows as U+FFFD, and SentencePiece drops the leading space
of the first piece exactly as it would for a whole text. An incremental detokeniser that diffs
``decode(ids[prefix:])`` against ``decode(ids[prefix:read])`` therefore sees stable prefixes.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import sentencepiece
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

Backend = Literal["auto", "tokenizers", "sentencepiece"]

# config.json model types whose instruct releases ship Mistral's own tokenizer files.
MISTRAL_MODEL_TYPES: frozenset[str] = frozenset({"mistral", "mixtral"})

# Vocabulary strings that end a turn in common chat formats. A token counts as end-of-generation
# only when the vocabulary also marks it special, so a plain-text token spelling one never stops
# generation. llama.cpp keeps a similar list for files whose metadata names only one EOS.
END_OF_TURN_PIECES: frozenset[str] = frozenset(
    {
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end|>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<end_of_turn>",
        "<EOT>",
        "<|END_OF_TURN_TOKEN|>",
        "<｜end▁of▁sentence｜>",
    }
)

# GGUF token types, numbered as llama.cpp writes them (the same numbers SentencePiece uses).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class TokenizerError(ValueError):
    """A tokenizer file or GGUF vocabulary is missing, corrupt or unsupported."""


@dataclass(frozen=True)
class SpecialIds:
    """Special token ids and BOS/EOS policy, resolved from whatever configuration a model ships."""

    bos: int | None = None
    eos: int | None = None
    pad: int | None = None
    extra_eos: frozenset[int] = frozenset()
    add_bos: bool = False
    add_eos: bool = False


class Tokenizer(ABC):
    """Text <-> token ids for one model.

    ``eos_token_ids`` holds every id that ends generation: the primary EOS, the ids a model's
    generation config lists, and special end-of-turn tokens such as ``<|im_end|>``.
    """

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    eos_token_ids: frozenset[int]
    pad_token_id: int | None
    add_bos: bool
    add_eos: bool

    def __init__(self, vocab_size: int, specials: SpecialIds) -> None:
        self.vocab_size = vocab_size
        self.bos_token_id = specials.bos
        self.eos_token_id = specials.eos
        self.pad_token_id = specials.pad
        self.add_bos = specials.add_bos and specials.bos is not None
        self.add_eos = specials.add_eos and specials.eos is not None
        ends = set(specials.extra_eos)
        if specials.eos is not None:
            ends.add(specials.eos)
        for piece in END_OF_TURN_PIECES:
            token_id = self.token_to_id(piece)
            if token_id is not None and self.is_special(token_id):
                ends.add(token_id)
        self.eos_token_ids = frozenset(i for i in ends if 0 <= i < vocab_size)

    @abstractmethod
    def encode(
        self, text: str, add_special_tokens: bool = True, *, split_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` BOS/EOS are added as the model expects.

        ``split_special_tokens`` encodes special-token strings in ``text`` as plain text.
        """

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is false."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The raw vocabulary string of one id, e.g. ``"▁Hello"``, ``"Ġworld"``, ``"<0x0A>"``."""

    @abstractmethod
    def token_to_id(self, piece: str) -> int | None:
        """The id of a raw vocabulary string, or None when the vocabulary has no such piece."""

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a control or added special token."""

    def token_text(self, token_id: int) -> str:
        """The text one token adds in the middle of a sequence (logprob entries, streaming tokens).

        Decoding a lone SentencePiece token drops its word-start space ("▁Hello" -> "Hello");
        mid-sequence that space is part of the token's text, so it is put back.
        """
        text = self.decode([token_id], skip_special_tokens=False)
        if self.id_to_piece(token_id).startswith("▁") and not text.startswith(" "):
            text = " " + text
        return text

    def _with_bos_eos(self, ids: list[int]) -> list[int]:
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if self.add_eos and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def _checked(self, ids: Sequence[int]) -> list[int]:
        # Both engines misbehave on foreign ids (one drops them silently, the other raises
        # IndexError), so reject them here with one clear error.
        checked = [int(i) for i in ids]
        if checked and (min(checked) < 0 or max(checked) >= self.vocab_size):
            bad = next(i for i in checked if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})")
        return checked


class TokenizersTokenizer(Tokenizer):
    """A HF `tokenizers.Tokenizer`; BOS/EOS are added by us, not by its post-processor."""

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, specials: SpecialIds, min_vocab_size: int = 0
    ) -> None:
        self._tok = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        ids = tokenizer.get_vocab(with_added_tokens=True).values()
        super().__init__(max(min_vocab_size, max(ids, default=-1) + 1), specials)

    @cached_property
    def _text_only(self) -> tokenizers.Tokenizer:
        # `encode_special_tokens` is a setting of the whole Rust object, so flipping it per call
        # would race between threads; a second copy that never matches special tokens does not.
        clone = tokenizers.Tokenizer.from_str(self._tok.to_str())
        clone.encode_special_tokens = True
        return clone

    def encode(
        self, text: str, add_special_tokens: bool = True, *, split_special_tokens: bool = False
    ) -> list[int]:
        engine = self._text_only if split_special_tokens else self._tok
        ids: list[int] = engine.encode(text, add_special_tokens=False).ids
        return self._with_bos_eos(ids) if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self._tok.decode(self._checked(ids), skip_special_tokens=skip_special_tokens)
        return text

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return str(piece)

    def token_to_id(self, piece: str) -> int | None:
        token_id = self._tok.token_to_id(piece)
        return None if token_id is None else int(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, plus tokens a HF config adds past its vocabulary.

    Control pieces (``<s>``, ``[INST]``) are the special tokens. When ``encode`` meets their strings
    in text, each stretch of text between them is encoded on its own, so it gets SentencePiece's
    dummy-prefix space, as llama.cpp does after a special token.
    """

    def __init__(
        self,
        processor: sentencepiece.SentencePieceProcessor,
        specials: SpecialIds,
        added: Mapping[int, tuple[str, bool]] | None = None,
    ) -> None:
        self._sp = processor
        self._base_size: int = processor.get_piece_size()
        self._added = {i: content for i, (content, _) in (added or {}).items()}
        controls = [i for i in range(self._base_size) if processor.IsControl(i)]
        added_special = {i for i, (_, special) in (added or {}).items() if special}
        self._special_ids = frozenset(controls) | added_special
        self._plain_added = {c: i for i, c in self._added.items() if i not in added_special}
        self._matched = {processor.id_to_piece(i): i for i in controls} | {
            c: i for i, c in self._added.items()
        }
        self._matched_re = _alternation(self._matched)
        self._plain_added_re = _alternation(self._plain_added)
        # SentencePiece strips the dummy-prefix space from the first piece it decodes; decoding
        # around literal special tokens needs to know whether to put it back.
        self._dummy_prefix = processor.encode("a", out_type=str)[0].startswith("▁")
        size = max(self._base_size, max(self._added, default=-1) + 1)
        super().__init__(size, specials)

    def encode(
        self, text: str, add_special_tokens: bool = True, *, split_special_tokens: bool = False
    ) -> list[int]:
        pattern = self._plain_added_re if split_special_tokens else self._matched_re
        lookup = self._plain_added if split_special_tokens else self._matched
        ids: list[int] = []
        if pattern is None:
            ids = list(self._sp.encode(text))
        else:
            for index, part in enumerate(pattern.split(text)):
                if index % 2:
                    ids.append(lookup[part])
                elif part:
                    ids.extend(self._sp.encode(part))
        return self._with_bos_eos(ids) if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        checked = self._checked(ids)
        if skip_special_tokens and not self._added:
            # SentencePiece treats control pieces as zero-width: mistral-common's decode.
            return str(self._sp.decode(checked))
        parts: list[str] = []
        run: list[int] = []
        for token_id in checked:
            if token_id in self._special_ids and skip_special_tokens:
                continue
            if token_id in self._special_ids or token_id >= self._base_size:
                self._flush(run, parts)
                parts.append(self.id_to_piece(token_id))
            else:
                run.append(token_id)
        self._flush(run, parts)
        return "".join(parts)

    def _flush(self, run: list[int], parts: list[str]) -> None:
        if not run:
            return
        text = str(self._sp.decode(run))
        if parts and self._dummy_prefix and self._sp.id_to_piece(run[0]).startswith("▁"):
            # Text after a literal special token keeps its space: "<s>[INST] Hello".
            text = " " + text
        if text:
            parts.append(text)
        run.clear()

    def id_to_piece(self, token_id: int) -> str:
        if token_id in self._added:
            return self._added[token_id]
        if not 0 <= token_id < self._base_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return str(self._sp.id_to_piece(token_id))

    def token_to_id(self, piece: str) -> int | None:
        if piece in self._matched:
            return self._matched[piece]
        token_id = int(self._sp.piece_to_id(piece))
        # piece_to_id answers the unknown id for any string it does not know.
        return token_id if self._sp.id_to_piece(token_id) == piece else None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


def _alternation(strings: Mapping[str, int]) -> re.Pattern[str] | None:
    if not strings:
        return None
    # Longest first, so "<|im_start|>" wins over a special token that is its prefix.
    ordered = sorted(strings, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(s) for s in ordered) + ")")


# --------------------------------------------------------------------------- model folders


@dataclass(frozen=True)
class _FolderConfig:
    """The JSON files beside a tokenizer that say which ids are special."""

    tokenizer_config: Mapping[str, Any]
    special_tokens_map: Mapping[str, Any]
    generation_config: Mapping[str, Any]
    model_config: Mapping[str, Any]

    @classmethod
    def read(cls, root: Path) -> _FolderConfig:
        return cls(
            _read_json(root / "tokenizer_config.json"),
            _read_json(root / "special_tokens_map.json"),
            _read_json(root / "generation_config.json"),
            _read_json(root / "config.json"),
        )


def _read_json(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_tokenizer(model_dir: str | Path, *, backend: Backend = "auto") -> Tokenizer:
    """Load the tokenizer of a model folder.

    ``backend="auto"`` uses ``tokenizer.json`` when the folder has one, with one exception: a
    Mistral release (config.json ``model_type`` mistral/mixtral) that ships a versioned
    SentencePiece file (``tokenizer.model.v1``/``.v3``, mistral-common's naming, which only
    Mistral's own repositories use) loads that file, so it tokenises exactly as mistral-common.
    ``backend="sentencepiece"`` forces the SentencePiece file (``tokenizer.model.v*`` or
    ``tokenizer.model``); ``backend="tokenizers"`` forces ``tokenizer.json``.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise TokenizerError(f"{root}: model folder does not exist")
    config = _FolderConfig.read(root)
    hf_file = root / "tokenizer.json"
    sp_file = _sentencepiece_file(root)
    if backend == "tokenizers" or (
        backend == "auto" and hf_file.is_file() and not _is_mistral_release(config, sp_file)
    ):
        if not hf_file.is_file():
            raise TokenizerError(f"{hf_file}: file not found")
        return _load_tokenizer_json(hf_file, config)
    if sp_file is None:
        wanted = "tokenizer.model" if backend == "sentencepiece" else "tokenizer.json or tokenizer.model"
        raise TokenizerError(f"{root}: no {wanted} found")
    return _load_sentencepiece_file(sp_file, config)


def _sentencepiece_file(root: Path) -> Path | None:
    versioned = []
    for path in root.glob("tokenizer.model.v*"):
        match = re.fullmatch(r"tokenizer\.model\.v(\d+)(m\d+)?", path.name)
        if match and path.is_file():
            versioned.append((int(match.group(1)), path))
    if versioned:
        return max(versioned)[1]
    plain = root / "tokenizer.model"
    return plain if plain.is_file() else None


def _is_mistral_release(config: _FolderConfig, sp_file: Path | None) -> bool:
    model_type = str(config.model_config.get("model_type", "")).lower()
    return model_type in MISTRAL_MODEL_TYPES and sp_file is not None and sp_file.name != "tokenizer.model"


def _load_tokenizer_json(path: Path, config: _FolderConfig) -> Tokenizer:
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust bindings raise bare Exception for malformed files
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({exc})") from exc
    _add_configured_tokens(tok, config.tokenizer_config)
    ids = _folder_special_ids(config, tok.token_to_id, SpecialIds())
    probe_plain = tok.encode("a", add_special_tokens=False).ids
    probe_full = tok.encode("a", add_special_tokens=True).ids
    # Without an explicit flag in tokenizer_config.json, do what the post-processor would do.
    grew = len(probe_full) > len(probe_plain)
    add_bos = _flag(config, "add_bos_token", grew and ids.bos is not None and probe_full[0] == ids.bos)
    add_eos = _flag(config, "add_eos_token", grew and ids.eos is not None and probe_full[-1] == ids.eos)
    return TokenizersTokenizer(tok, _replace_flags(ids, add_bos, add_eos))


def _load_sentencepiece_file(path: Path, config: _FolderConfig) -> Tokenizer:
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{path}: not a valid SentencePiece model ({exc})") from exc
    base = processor.get_piece_size()
    added: dict[int, tuple[str, bool]] = {}
    for key, entry in _added_tokens_decoder(config.tokenizer_config).items():
        if key >= base:
            added[key] = entry
    defaults = SpecialIds(
        bos=_non_negative(processor.bos_id()),
        eos=_non_negative(processor.eos_id()),
        pad=_non_negative(processor.pad_id()),
    )
    lookup = {processor.id_to_piece(i): i for i in range(base)} | {c: i for i, (c, _) in added.items()}
    ids = _folder_special_ids(config, lookup.get, defaults)
    # SentencePiece models (Llama, Mistral) are trained with BOS and no EOS.
    flags = _replace_flags(ids, _flag(config, "add_bos_token", True), _flag(config, "add_eos_token", False))
    return SentencePieceTokenizer(processor, flags, added)


def _added_tokens_decoder(tokenizer_config: Mapping[str, Any]) -> dict[int, tuple[str, bool]]:
    entries = tokenizer_config.get("added_tokens_decoder") or {}
    found: dict[int, tuple[str, bool]] = {}
    if isinstance(entries, Mapping):
        for key, entry in entries.items():
            if isinstance(entry, Mapping) and str(key).isdigit() and isinstance(entry.get("content"), str):
                found[int(key)] = (entry["content"], bool(entry.get("special", False)))
    return found


def _add_configured_tokens(tok: tokenizers.Tokenizer, tokenizer_config: Mapping[str, Any]) -> None:
    # transformers registers tokenizer_config.json's added tokens on top of tokenizer.json; a
    # token only listed there (or only marked special there) must still be matched whole.
    known = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    for content, special in _added_tokens_decoder(tokenizer_config).values():
        if known.get(content) == special:
            continue
        if special:
            tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        else:
            tok.add_tokens([AddedToken(content, special=False, normalized=False)])


def _folder_special_ids(
    config: _FolderConfig, lookup: Callable[[str], int | None], defaults: SpecialIds
) -> SpecialIds:
    """Resolve BOS/EOS/PAD: tokenizer_config > special_tokens_map > generation_config > config.json."""

    def named(name: str) -> int | None:
        for source in (config.tokenizer_config, config.special_tokens_map):
            text = _token_text(source.get(name))
            token_id = None if text is None else lookup(text)
            if token_id is not None:
                return int(token_id)
        return None

    def numbered(key: str) -> int | None:
        for source in (config.generation_config, config.model_config):
            listed = _id_list(source.get(key))
            if listed:
                return listed[0]
        return None

    extra_eos = frozenset(_id_list(config.generation_config.get("eos_token_id"))) | frozenset(
        _id_list(config.model_config.get("eos_token_id"))
    )
    return SpecialIds(
        bos=_first(named("bos_token"), numbered("bos_token_id"), defaults.bos),
        eos=_first(named("eos_token"), numbered("eos_token_id"), defaults.eos),
        pad=_first(named("pad_token"), numbered("pad_token_id"), defaults.pad),
        extra_eos=extra_eos,
    )


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells a special token as a string or as a serialised AddedToken.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _non_negative(value: int) -> int | None:
    return value if value >= 0 else None


def _flag(config: _FolderConfig, key: str, default: bool) -> bool:
    value = config.tokenizer_config.get(key)
    return value if isinstance(value, bool) else default


def _replace_flags(ids: SpecialIds, add_bos: bool, add_eos: bool) -> SpecialIds:
    return SpecialIds(ids.bos, ids.eos, ids.pad, ids.extra_eos, add_bos, add_eos)


# --------------------------------------------------------------------------- GGUF metadata


@dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp splits text before byte-level BPE for one ``tokenizer.ggml.pre`` value."""

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2 = _PreTokenizer((_GPT2_SPLIT,))
_DIGITS_THEN_GPT2 = _PreTokenizer((r"\p{N}", _GPT2_SPLIT))
_LLAMA3 = _PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = _PreTokenizer((_QWEN2_SPLIT,))

# Values of `tokenizer.ggml.pre` -> the regex list llama.cpp's llama-vocab.cpp applies for them.
_PRE_TOKENIZERS: Mapping[str, _PreTokenizer] = MappingProxyType(
    {
        "default": _DEFAULT,
        "gpt-2": _GPT2,
        "phi-2": _GPT2,
        "mpt": _GPT2,
        "olmo": _GPT2,
        "jais": _GPT2,
        "smollm": _DIGITS_THEN_GPT2,
        "starcoder": _DIGITS_THEN_GPT2,
        "refact": _DIGITS_THEN_GPT2,
        "command-r": _DIGITS_THEN_GPT2,
        "codeshell": _DIGITS_THEN_GPT2,
        "llama3": _LLAMA3,
        "llama-v3": _LLAMA3,
        "llama-bpe": _LLAMA3,
        "falcon3": _LLAMA3,
        "pixtral": _LLAMA3,
        "dbrx": _LLAMA3,
        "smaug-bpe": _LLAMA3,
        "qwen2": _QWEN2,
        "deepseek-r1-qwen": _QWEN2,
        "stablelm2": _QWEN2,
        "tekken": _PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
    }
)


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF file describes from its metadata (key -> plain Python value).

    ``tokenizer.ggml.model`` ``"llama"`` becomes a SentencePiece BPE model (pieces, scores and
    token types; byte fallback when the vocabulary has byte pieces; the dummy prefix per
    ``add_space_prefix``); ``"gpt2"`` becomes a byte-level BPE from tokens and merges, split first
    by the regexes llama.cpp uses for ``tokenizer.ggml.pre``.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_from_gguf(metadata)
    if kind == "gpt2":
        return _byte_level_from_gguf(metadata)
    raise TokenizerError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (supported: 'llama', 'gpt2')")


def _gguf_tokens(metadata: Mapping[str, Any]) -> list[str]:
    raw = metadata.get("tokenizer.ggml.tokens")
    if not raw:
        raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens")
    return [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t) for t in raw]


def _gguf_list(metadata: Mapping[str, Any], key: str, size: int, default: Any) -> list[Any]:
    values = metadata.get(key)
    if values is None:
        return [default] * size
    values = list(values)
    if len(values) != size:
        raise TokenizerError(f"GGUF {key} has {len(values)} entries for {size} tokens")
    return values


def _gguf_id(metadata: Mapping[str, Any], key: str, size: int) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{key}")
    if value is None or isinstance(value, bool):
        return None
    return int(value) if 0 <= int(value) < size else None


def _gguf_specials(metadata: Mapping[str, Any], size: int, add_bos_default: bool) -> SpecialIds:
    extra = {_gguf_id(metadata, key, size) for key in ("eot_token_id", "eom_token_id")}
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    return SpecialIds(
        bos=_gguf_id(metadata, "bos_token_id", size),
        eos=_gguf_id(metadata, "eos_token_id", size),
        pad=_gguf_id(metadata, "padding_token_id", size),
        extra_eos=frozenset(i for i in extra if i is not None),
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
    )


def _sentencepiece_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    # Imported here: the generated protobuf module needs the protobuf runtime, which only this
    # path uses.
    from sentencepiece import sentencepiece_model_pb2

    spm: Any = sentencepiece_model_pb2  # generated protobuf code: no static types to check

    tokens = _gguf_tokens(metadata)
    scores = _gguf_list(metadata, "tokenizer.ggml.scores", len(tokens), 0.0)
    types = [int(t) for t in _gguf_list(metadata, "tokenizer.ggml.token_type", len(tokens), _NORMAL)]
    types = [t if _NORMAL <= t <= _BYTE else _NORMAL for t in types]
    unknown = _gguf_id(metadata, "unknown_token_id", len(tokens))
    if _UNKNOWN not in types:
        if unknown is None:
            raise TokenizerError("GGUF llama vocabulary has no unknown token, which SentencePiece requires")
        types[unknown] = _UNKNOWN
    proto = spm.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, float(score), kind
    trainer = proto.trainer_spec
    trainer.model_type = spm.TrainerSpec.BPE
    trainer.byte_fallback = _BYTE in types
    trainer.unk_id = types.index(_UNKNOWN)
    # BOS/EOS are ours to add; -1 keeps SentencePiece from checking pieces it never uses.
    trainer.bos_id = trainer.eos_id = trainer.pad_id = -1
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = bool(metadata.get("tokenizer.ggml.remove_extra_whitespaces", False))
    normalizer.escape_whitespaces = True
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except RuntimeError as exc:
        raise TokenizerError(f"GGUF llama vocabulary is not a valid SentencePiece model ({exc})") from exc
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    return SentencePieceTokenizer(processor, _gguf_specials(metadata, len(tokens), add_bos_default=True))


def _byte_level_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    tokens = _gguf_tokens(metadata)
    types = [int(t) for t in _gguf_list(metadata, "tokenizer.ggml.token_type", len(tokens), _NORMAL)]
    raw_merges = metadata.get("tokenizer.ggml.merges")
    if not raw_merges:
        raise TokenizerError("GGUF gpt2 vocabulary has no tokenizer.ggml.merges")
    merges = []
    for merge in raw_merges:
        left, _, right = str(merge).partition(" ")
        merges.append((left, right))
    pre_name = str(metadata.get("tokenizer.ggml.pre") or "default")
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise TokenizerError(
            f"GGUF tokenizer.ggml.pre {pre_name!r} is not supported (supported: {sorted(_PRE_TOKENIZERS)})"
        )
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in pre.splits]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # Control tokens are special; user-defined ones are matched whole in text but are not special.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )
    specials = _gguf_specials(metadata, len(tokens), add_bos_default=pre.add_bos)
    return TokenizersTokenizer(tok, specials, min_vocab_size=len(tokens))

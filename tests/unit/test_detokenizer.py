"""Incremental detokenisation: UTF-8 safe, SentencePiece spaces kept, stop strings held back and cut."""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import pytest

from levante.engine.detokenizer import IncrementalDetokenizer
from levante.loaders.gguf import GGUFFile
from levante.loaders.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf

TEXTS = [
    "Hello wörld, ça va? Ünïcödé",
    "日本語のテキスト 和 中文 混合",
    "emoji 🎉🚀👩‍👩‍👧 and flags 🇪🇸 done",
    "code:\n    def f(x):\n        return x  # tabs\tand   spaces",
    " leading space and trailing ",
]


@pytest.fixture(scope="module", params=["sentencepiece", "byte-level"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Tokenizer:
    if request.param == "sentencepiece":
        folder = tmp_path_factory.mktemp("spm")
        shutil.copy(Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1")), folder / "tokenizer.model")
        return load_tokenizer(folder)
    with GGUFFile(smollm2_gguf) as gguf:
        return tokenizer_from_gguf(gguf.metadata)


def stream(tok: Tokenizer, ids: list[int], detok: IncrementalDetokenizer) -> list[str]:
    deltas = []
    for i in range(1, len(ids) + 1):
        stop = detok.add(ids[:i])
        if stop is not None:
            deltas.append(detok.take(finished=True))
            return deltas
        deltas.append(detok.take(finished=False))
    detok.flush(ids)
    deltas.append(detok.take(finished=True))
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode_and_never_split_a_character(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(tokenizer, ids, IncrementalDetokenizer(tokenizer))
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_arrive_whole_from_byte_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # both vocabularies spell this emoji with several byte tokens
    deltas = stream(tokenizer, ids, IncrementalDetokenizer(tokenizer))
    assert [d for d in deltas if d] == [tokenizer.decode(ids)]


def test_stop_string_is_held_back_then_cut(tokenizer: Tokenizer) -> None:
    text = "alpha beta STOP gamma delta"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    deltas = stream(tokenizer, ids, detok)
    assert "".join(deltas) == tokenizer.decode(ids).split("STOP")[0]
    assert "STOP" not in "".join(deltas)


def test_earliest_stop_string_wins_and_can_be_kept(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["four", "two"], include_stop=True)
    deltas = stream(tokenizer, ids, detok)
    assert "".join(deltas).strip() == "one two"


def test_holdback_never_emits_a_prefix_of_a_stop_string_that_later_matches(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("the end marker <END> follows", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["<END>"])
    emitted = ""
    for i in range(1, len(ids) + 1):
        stop = detok.add(ids[:i])
        emitted += detok.take(finished=stop is not None)
        assert "<" not in emitted  # the "<" of "<END>" is held until the match is decided
        if stop is not None:
            break
    assert emitted.rstrip() == "the end marker"

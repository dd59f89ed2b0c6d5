"""JSON mode (OpenAI's ``response_format={"type": "json_object"}``) as constrained decoding.

A logits processor masks, at every step, each token whose bytes would make the output stop
being a prefix of ``<whitespace> { ... }``; once the object is closed only EOS is left. The
grammar is RFC 8259 (escapes including ``\\uXXXX``, numbers with sign, fraction and exponent,
``true``/``false``/``null``, nested arrays and objects) run over UTF-8 *bytes*, so byte-fallback
(``<0xE2>``) and byte-level BPE fragments of one character are checked byte by byte, and a
string may only close on a complete, valid UTF-8 character.

Three pieces:

* `JsonAutomaton`: a byte-level pushdown automaton. Its state is a small tuple
  ``(mode, stack, ws)``: the lexer mode, the open containers as a string of ``{``/``[`` and the
  length of the current whitespace run (bounded, so a model cannot idle on whitespace).
* `JsonVocabulary`: per tokenizer, built once and shared: each token's bytes, the tokens that
  are plain string content (no ``"``, ``\\``, control byte, and whole UTF-8 characters), all
  token bytes sorted so that a prefix is a contiguous range (a trie without nodes), and a
  memo of allowed tokens per ``(mode, stack)``.
* `JsonObjectProcessor`: per request; advances the automaton over the new output ids and masks.

Computing a mask. Inside a string most of the vocabulary is allowed, so that mask is the
precomputed "plain content" set plus the few other tokens that survive a run of the automaton
(``"}`` closes the string and the object; ``\\n`` is an escape). Elsewhere few tokens fit, so the
sorted vocabulary is walked as a trie and a whole subtree is dropped as soon as its prefix is
rejected. Worked example, after ``{"a":`` (mode VALUE, stack ``{``)::

    first byte " "   -> ws run 1, walk on: " 1", " true", " \"" survive, " the" dies at "t"->"h"
    first byte "\""  -> a string opens: every token ``"xyz`` whose rest is plain content is taken
                        at once; the others (``"}``, ``","``) are run byte by byte
    first byte "1"   -> a number: "1", "12", "1." survive
    first byte "x"   -> rejected: no token starting with "x" is looked at again

The masks repeat (the states "after a comma in an object" or "in a value string one level
deep" recur all through a document), so each is computed once per vocabulary. The whitespace
run carried in from earlier tokens is not part of the memo key: the memoised mask assumes an
empty run and tokens whose leading whitespace would overflow the run are filtered out per step.

Bounds that keep a model from stalling (the only valid JSON objects refused): at most 4
whitespace characters before ``{``, at most 20 in any run between tokens, nesting at most 64
deep, and nothing but EOS after the closing ``}`` (not even whitespace). Tokens that add no
text, special tokens other than EOS and the unknown token are never allowed.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from levante.loaders.tokenizer import Tokenizer
from levante.sampling_params import LogitsProcessor

State = tuple[int, str, int]  # (mode, open containers as "{"/"[" characters, whitespace run)
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Modes outside strings: where we are in the grammar and what may come next.
START = 0  # before the top-level "{"
OBJ_FIRST = 1  # after "{": a key or "}"
OBJ_NEXT = 2  # after "," in an object: a key
COLON = 3  # after a key
VALUE = 4  # after ":" or "," in an array: a value
ARR_FIRST = 5  # after "[": a value or "]"
AFTER = 6  # after a value: ",", or the closer of the innermost container
DONE = 7  # the top-level object is closed
# Numbers: after "-", a leading "0", integer digits, ".", fraction digits, "e", exponent sign, digits.
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8, 16)
LITERAL = 16  # 16..25: inside true / false / null, one mode per character still expected
# Strings: plain content, after "\", the four hex digits of \uXXXX, and pending UTF-8
# continuation bytes (UTF1..3: that many left; E0/ED/F0/F4: the lead bytes whose first
# continuation byte has a narrower range). A key string is the same mode plus KEY.
STR, ESC, HEX1, HEX2, HEX3, HEX4, UTF1, UTF2, UTF3, UTF_E0, UTF_ED, UTF_F0, UTF_F4 = range(32, 45)
KEY = 16
_NUM_MODES = STR + KEY + 13

# Transition actions that are not simply "go to mode n, stack unchanged, whitespace run reset".
_DEAD, _WS, _WS_END, _OPEN_OBJ, _OPEN_ARR, _CLOSE_OBJ, _CLOSE_ARR, _COMMA = range(-1, -9, -1)

_WHITESPACE = b" \t\n\r"
_Put = Callable[[int, bytes | range, int], None]
_HEX = b"0123456789abcdefABCDEF"


def _build_table() -> tuple[tuple[int, ...], ...]:
    """The action for every (mode, byte): a target mode (>= 0) or one of the negative actions above."""
    rows = [[_DEAD] * 256 for _ in range(_NUM_MODES)]

    def put(mode: int, chars: bytes | range, action: int) -> None:
        for c in chars:
            rows[mode][c] = action

    for mode in (START, OBJ_FIRST, OBJ_NEXT, COLON, VALUE, ARR_FIRST, AFTER):
        put(mode, _WHITESPACE, _WS)
    put(START, b"{", _OPEN_OBJ)
    put(OBJ_FIRST, b'"', STR + KEY)
    put(OBJ_FIRST, b"}", _CLOSE_OBJ)
    put(OBJ_NEXT, b'"', STR + KEY)
    put(COLON, b":", VALUE)
    literals = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
    for mode in (VALUE, ARR_FIRST):
        put(mode, b'"', STR)
        put(mode, b"{", _OPEN_OBJ)
        put(mode, b"[", _OPEN_ARR)
        put(mode, b"-", N_MINUS)
        put(mode, b"0", N_ZERO)
        put(mode, b"123456789", N_INT)
    put(ARR_FIRST, b"]", _CLOSE_ARR)
    put(AFTER, b",", _COMMA)
    put(AFTER, b"}", _CLOSE_OBJ)
    put(AFTER, b"]", _CLOSE_ARR)
    _number_rows(rows, put)
    mode = LITERAL
    for first, rest in literals.items():
        put(VALUE, bytes([first]), mode)
        put(ARR_FIRST, bytes([first]), mode)
        for index, char in enumerate(rest):
            put(mode, bytes([char]), AFTER if index == len(rest) - 1 else mode + 1)
            mode += 1
    for key in (0, KEY):
        _string_rows(rows, put, key)
    return tuple(tuple(row) for row in rows)


def _number_rows(rows: list[list[int]], put: _Put) -> None:
    digits = b"0123456789"
    for mode in (N_ZERO, N_INT, N_FRAC, N_EXP):  # a number may end here: what may follow a value
        rows[mode] = list(rows[AFTER])
        put(mode, _WHITESPACE, _WS_END)
    put(N_MINUS, b"0", N_ZERO)
    put(N_MINUS, b"123456789", N_INT)
    put(N_INT, digits, N_INT)
    for mode in (N_ZERO, N_INT):
        put(mode, b".", N_DOT)
    for mode in (N_ZERO, N_INT, N_FRAC):
        put(mode, b"eE", N_E)
    put(N_DOT, digits, N_FRAC)
    put(N_FRAC, digits, N_FRAC)
    put(N_E, b"+-", N_ESIGN)
    for mode in (N_E, N_ESIGN, N_EXP):
        put(mode, digits, N_EXP)


def _string_rows(rows: list[list[int]], put: _Put, key: int) -> None:
    s = STR + key
    put(s, range(0x20, 0x80), s)
    put(s, b'"', COLON if key else AFTER)
    put(s, b"\\", ESC + key)
    # UTF-8 lead bytes (RFC 3629: no overlongs, no surrogates, nothing past U+10FFFF).
    put(s, range(0xC2, 0xE0), UTF1 + key)
    put(s, b"\xe0", UTF_E0 + key)
    put(s, bytes([*range(0xE1, 0xED), 0xEE, 0xEF]), UTF2 + key)
    put(s, b"\xed", UTF_ED + key)
    put(s, b"\xf0", UTF_F0 + key)
    put(s, range(0xF1, 0xF4), UTF3 + key)
    put(s, b"\xf4", UTF_F4 + key)
    put(ESC + key, b'"\\/bfnrt', s)
    put(ESC + key, b"u", HEX1 + key)
    put(HEX1 + key, _HEX, HEX2 + key)
    put(HEX2 + key, _HEX, HEX3 + key)
    put(HEX3 + key, _HEX, HEX4 + key)
    put(HEX4 + key, _HEX, s)
    continuation = range(0x80, 0xC0)
    put(UTF1 + key, continuation, s)
    put(UTF2 + key, continuation, UTF1 + key)
    put(UTF3 + key, continuation, UTF2 + key)
    put(UTF_E0 + key, range(0xA0, 0xC0), UTF1 + key)
    put(UTF_ED + key, range(0x80, 0xA0), UTF1 + key)
    put(UTF_F0 + key, range(0x90, 0xC0), UTF2 + key)
    put(UTF_F4 + key, range(0x80, 0x90), UTF2 + key)


_TABLE = _build_table()


class JsonAutomaton:
    """Byte-level recogniser of prefixes of ``<ws> {...}``.

    >>> a = JsonAutomaton()
    >>> a.feed(a.initial, b' {"a": [1, -0.5e+10, "\\\\u00e9"]}')[0] == DONE
    True
    >>> a.feed(a.initial, b'{"a": 01') is None
    True
    """

    def __init__(self, max_whitespace_run: int = 20, max_leading_whitespace: int = 4, max_depth: int = 64) -> None:
        self.max_whitespace_run = max_whitespace_run
        self.max_leading_whitespace = max_leading_whitespace
        self.max_depth = max_depth
        self.initial: State = (START, "", 0)

    def whitespace_budget(self, mode: int) -> int:
        return self.max_leading_whitespace if mode == START else self.max_whitespace_run

    def step(self, state: State, byte: int) -> State | None:
        """The state after one more byte, or None when the text can no longer become valid."""
        mode, stack, ws = state
        action = _TABLE[mode][byte]
        if action >= 0:
            return (action, stack, 0)
        if action == _WS:
            return (mode, stack, ws + 1) if ws < self.whitespace_budget(mode) else None
        if action == _WS_END:
            return (AFTER, stack, 1) if self.max_whitespace_run > 0 else None
        if action in (_OPEN_OBJ, _OPEN_ARR):
            if len(stack) >= self.max_depth:
                return None
            return (OBJ_FIRST, stack + "{", 0) if action == _OPEN_OBJ else (ARR_FIRST, stack + "[", 0)
        if action in (_CLOSE_OBJ, _CLOSE_ARR):
            if not stack or stack[-1] != ("{" if action == _CLOSE_OBJ else "["):
                return None
            rest = stack[:-1]
            return (AFTER if rest else DONE, rest, 0)
        if action == _COMMA:
            return (OBJ_NEXT if stack[-1] == "{" else VALUE, stack, 0)
        return None

    def feed(self, state: State | None, data: bytes, start: int = 0) -> State | None:
        step = self.step
        for index in range(start, len(data)):
            if state is None:
                return None
            state = step(state, data[index])
        return state


# --------------------------------------------------------------------------- vocabulary

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable stand-in character -> the byte it encodes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def token_bytes(tokenizer: Tokenizer, token_id: int, alphabet: dict[str, int]) -> bytes | None:
    """The bytes one token adds mid-sequence, or None for a token JSON mode never emits.

    ``token_text`` is exact for whole characters; byte tokens (``<0xE2>``, or GPT-2's ``â``
    stand-ins) decode to U+FFFD alone, so their bytes come from the vocabulary piece instead.
    """
    piece = tokenizer.id_to_piece(token_id)
    text = tokenizer.token_text(token_id)
    match = _BYTE_PIECE.fullmatch(piece)
    if match and text != piece:
        return bytes([int(match.group(1), 16)])
    if piece == "<unk>" and text != piece:
        return None
    if "\ufffd" in text and "\ufffd" not in piece:
        if any(c not in alphabet for c in piece):
            return None
        raw = bytes(alphabet[c] for c in piece)
        return raw if raw.decode("utf-8", "replace") == text else None
    if "▁" in piece:
        # Decoding one SentencePiece token eats one leading space even of "▁▁"; mid-sequence
        # every "▁" is a space.
        spaced = piece.replace("▁", " ")
        if spaced.lstrip(" ") == text.lstrip(" "):
            text = spaced
    return text.encode("utf-8") or None


def _is_special_byte(b: int) -> bool:
    """Bytes that do something inside a string: end it, escape, are invalid, or start UTF-8."""
    return b in (0x22, 0x5C) or b < 0x20 or b >= 0x80


def _is_plain_content(data: bytes) -> bool:
    """Whether a string stays a plain open string after these bytes (whole UTF-8 characters only)."""
    if any(b in (0x22, 0x5C) or b < 0x20 for b in data):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True)
class _Mask:
    """Allowed tokens in one (mode, stack): ``ids`` plus, in a string, every plain-content token."""

    with_plain: bool
    ids: IntArray  # [K] token ids, sorted
    lead_ws: IntArray  # [K] leading whitespace bytes of each of ids


def _plain(mode: int) -> bool:
    return mode in (STR, STR + KEY)


class JsonVocabulary:
    """Everything about one tokenizer that JSON mode needs; build once per model, share across requests.

    Masks are numpy arrays, applied through numpy on CPU: a vocabulary-sized torch op is
    parallelised over torch's thread pool, and on a busy machine waiting for that pool costs
    milliseconds where the work itself costs microseconds.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_whitespace_run: int = 20,
        max_leading_whitespace: int = 4,
        max_depth: int = 64,
        cache_size: int = 4096,
    ) -> None:
        self.automaton = JsonAutomaton(max_whitespace_run, max_leading_whitespace, max_depth)
        self.vocab_size = tokenizer.vocab_size
        self.eos_ids: IntArray = np.array(sorted(tokenizer.eos_token_ids), dtype=np.int64)
        eos = frozenset(tokenizer.eos_token_ids)
        alphabet = _byte_level_alphabet()
        self.token_bytes: list[bytes | None] = [
            None if i in eos or tokenizer.is_special(i) else token_bytes(tokenizer, i, alphabet)
            for i in range(self.vocab_size)
        ]
        usable = [i for i, data in enumerate(self.token_bytes) if data is not None]
        self._build_string_classes(usable)
        self._build_sorted(usable)
        self._masks: dict[tuple[int, str], _Mask] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._blocked_cache: dict[int, BoolArray] = {}

    def _build_string_classes(self, usable: list[int]) -> None:
        data = self.token_bytes
        self.plain_content = [False] * self.vocab_size  # token keeps a plain open string plain
        lead = np.zeros(self.vocab_size, dtype=np.int32)
        # The other tokens, with where their first special byte is: the bytes before it are
        # no-ops inside a string, so a run of the automaton can start there.
        self._other_ids: list[int] = []
        self._other_start: list[int] = []
        for i in usable:
            raw = data[i] or b""
            lead[i] = len(raw) - len(raw.lstrip(_WHITESPACE))
            self.plain_content[i] = _is_plain_content(raw)
            if not self.plain_content[i]:
                self._other_ids.append(i)
                self._other_start.append(next(k for k, b in enumerate(raw) if _is_special_byte(b)))
        self._lead_ws: IntArray = lead.astype(np.int64)  # [V]
        self._not_plain: BoolArray = ~np.array(self.plain_content, dtype=bool)  # [V]
        self._has_plain = not bool(self._not_plain.all())

    def _build_sorted(self, usable: list[int]) -> None:
        # Sorted, a vocabulary is a trie: the tokens under any prefix form one contiguous range.
        pairs = sorted((self.token_bytes[i] or b"", i) for i in usable)
        self._keys = [key for key, _ in pairs]
        self._order: IntArray = np.array([i for _, i in pairs], dtype=np.int64)  # [N] position -> id
        last = [max((k for k, b in enumerate(key) if _is_special_byte(b)), default=-1) for key in self._keys]
        self._last_special: IntArray = np.array(last, dtype=np.int64)  # [N]

    # ----------------------------------------------------------------- per-step use

    def advance(self, state: State | None, token_id: int) -> State | None:
        """The automaton state after one more token (None: the output can no longer be JSON)."""
        if state is None or not 0 <= token_id < self.vocab_size:
            return None
        if _plain(state[0]) and self.plain_content[token_id]:
            return state
        data = self.token_bytes[token_id]
        return None if data is None else self.automaton.feed(state, data)

    def allowed_ids(self, state: State | None) -> IntArray:
        """Sorted ids allowed after ``state``; EOS alone once the object is closed."""
        ids, with_plain = self._allowed(state)
        if not with_plain:
            return ids
        keep = ~self._not_plain
        keep[ids] = True
        return np.flatnonzero(keep)

    def apply(self, state: State | None, logits: torch.Tensor) -> torch.Tensor:
        """logits: [V'] -> a copy with every token not allowed after ``state`` at -inf."""
        ids, with_plain = self._allowed(state)
        n = logits.shape[-1]
        ids = ids[ids < n] if n < self.vocab_size else ids
        if logits.device.type != "cpu" or logits.dtype not in _NUMPY_DTYPES:
            return _apply_torch(logits, ids, self._blocked_outside_plain(n) if with_plain else None)
        row = logits.detach().numpy()
        if with_plain:
            blocked = self._blocked_outside_plain(n).copy()
            blocked[ids] = False
            out = row.copy()
            out[blocked] = -np.inf
        else:
            out = np.full(n, -np.inf, dtype=row.dtype)
            out[ids] = row[ids]
        return torch.from_numpy(out)

    def _allowed(self, state: State | None) -> tuple[IntArray, bool]:
        if state is None or state[0] == DONE:
            return self.eos_ids, False
        mask = self._mask(state)
        mode, _, ws = state
        ids = mask.ids
        if ws:  # the memoised mask assumed no whitespace before it
            ids = ids[mask.lead_ws <= self.automaton.whitespace_budget(mode) - ws]
        if ids.size or (mask.with_plain and self._has_plain):
            return ids, mask.with_plain
        return self.eos_ids, False  # nothing fits: should not happen, but never leave nothing

    def _blocked_outside_plain(self, n: int) -> BoolArray:
        blocked = self._blocked_cache.get(n)
        if blocked is None:
            blocked = np.ones(n, dtype=bool)
            size = min(n, self.vocab_size)
            blocked[:size] = self._not_plain[:size]
            self._blocked_cache[n] = blocked
        return blocked

    # ----------------------------------------------------------------- mask computation

    def _mask(self, state: State) -> _Mask:
        key = (state[0], state[1])
        with self._lock:
            mask = self._masks.get(key)
        if mask is not None:
            return mask
        mask = self._compute((state[0], state[1], 0))
        with self._lock:
            if len(self._masks) >= self._cache_size:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = mask
        return mask

    def _compute(self, state: State) -> _Mask:
        if _plain(state[0]):
            feed, data = self.automaton.feed, self.token_bytes
            found = [
                i
                for i, start in zip(self._other_ids, self._other_start, strict=True)
                if feed(state, data[i] or b"", start) is not None
            ]
            ids = np.array(sorted(found), dtype=np.int64)
            return _Mask(True, ids, self._lead_ws[ids])
        ids = np.sort(self._order[self._walk(state)])
        return _Mask(False, ids, self._lead_ws[ids])

    def _walk(self, root: State) -> IntArray:
        """Positions (in sorted order) of the tokens the automaton accepts from ``root``."""
        keys, step, feed = self._keys, self.automaton.step, self.automaton.feed
        singles: list[int] = []
        chunks: list[IntArray] = []
        todo: list[tuple[int, int, int, State]] = [(0, len(keys), 0, root)]
        while todo:
            lo, hi, depth, state = todo.pop()
            while depth and lo < hi and len(keys[lo]) == depth:  # tokens that end at this node
                singles.append(lo)
                lo += 1
            if lo >= hi:
                continue
            if _plain(state[0]):
                # Inside a string: take every token whose rest is plain text at once.
                quiet = self._last_special[lo:hi] < depth
                chunks.append(np.flatnonzero(quiet) + lo)
                for pos in (np.flatnonzero(~quiet) + lo).tolist():
                    if feed(state, keys[pos], depth) is not None:
                        singles.append(pos)
                continue
            i = lo
            while i < hi:
                key = keys[i]
                b = key[depth]
                j = hi if b == 255 else bisect.bisect_left(keys, key[:depth] + bytes((b + 1,)), i, hi)
                child = step(state, b)
                if child is not None:
                    todo.append((i, j, depth + 1, child))
                i = j
        return np.concatenate([*chunks, np.array(singles, dtype=np.int64)])


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def _apply_torch(logits: torch.Tensor, ids: IntArray, blocked: BoolArray | None) -> torch.Tensor:
    """`JsonVocabulary.apply` for tensors numpy cannot view (an accelerator, bfloat16)."""
    index = torch.from_numpy(ids).to(logits.device)
    if blocked is not None:
        mask = torch.from_numpy(blocked).to(logits.device)  # a copy: the cached array stays intact
        mask[index] = False
        return logits.masked_fill(mask, float("-inf"))
    out = torch.full_like(logits, float("-inf"))
    out[index] = logits[index]
    return out


def json_vocabulary(tokenizer: Tokenizer) -> JsonVocabulary:
    """The tokenizer's `JsonVocabulary`, built on first use and kept on the tokenizer object."""
    vocab = getattr(tokenizer, "_levante_json_vocabulary", None)
    if not isinstance(vocab, JsonVocabulary):
        vocab = JsonVocabulary(tokenizer)
        tokenizer._levante_json_vocabulary = vocab  # type: ignore[attr-defined]
    return vocab


# --------------------------------------------------------------------------- per request


@dataclass
class _Track:
    """One output sequence the processor has followed: its ids so far and the state they lead to."""

    ids: list[int]
    state: State | None


class JsonObjectProcessor:
    """Stateful, one per request. Called as ``f(output_ids, logits_row) -> logits_row``.

    Each call advances the automaton over just the ids added since the last call. The processor
    keeps a few tracks (sequences it has followed), so it stays right when the samples of an
    ``n > 1`` request share it: a call continues the longest track its ids extend, and a
    sequence that extends none is replayed from the start.
    """

    max_tracks = 32

    def __init__(self, vocab: JsonVocabulary) -> None:
        self.vocab = vocab
        self._tracks: list[_Track] = []  # least recently used first
        self.state: State | None = vocab.automaton.initial  # of the sequence seen last

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        ids = [int(i) for i in output_ids]
        track = self._track_for(ids)
        for token_id in ids[len(track.ids) :]:
            track.state = self.vocab.advance(track.state, token_id)
        track.ids = ids
        self.state = track.state
        return self.vocab.apply(track.state, logits)

    def _track_for(self, ids: list[int]) -> _Track:
        best: _Track | None = None
        for track in self._tracks:
            n = len(track.ids)
            if n <= len(ids) and (best is None or n > len(best.ids)) and ids[:n] == track.ids:
                best = track
        if best is None:
            best = _Track([], self.vocab.automaton.initial)
            if len(self._tracks) >= self.max_tracks:
                self._tracks.pop(0)
        else:
            self._tracks.remove(best)
        self._tracks.append(best)
        return best

    @property
    def complete(self) -> bool:
        """Whether the sequence seen last is a whole JSON object."""
        return self.state is not None and self.state[0] == DONE


def json_object_processor(vocab: JsonVocabulary) -> LogitsProcessor:
    """A new logits processor for one request whose output must be a JSON object."""
    return JsonObjectProcessor(vocab)

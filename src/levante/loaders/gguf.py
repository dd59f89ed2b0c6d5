"""A strict GGUF v2/v3 reader that memory-maps the file and dequantises tensors with torch.

File layout (all little-endian)::

    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv      x  string key | u32 value_type | value
    n_tensors x  string name | u32 n_dims | n_dims x u64 ne | u32 ggml_type | u64 offset
    zero padding up to general.alignment (default 32)
    tensor data; each tensor's offset is relative to the start of this section

A string is a u64 byte length followed by UTF-8 bytes; an array is a u32 element type, a u64
count and the elements. ``ne`` lists dimensions fastest-varying first, so a PyTorch shape is
``ne`` reversed: ``token_embd.weight`` with ``ne = [hidden, vocab]`` becomes ``(vocab, hidden)``.

Every count and length in the header is checked against the bytes left in the file *before* it
is used, so a hostile or truncated file costs at most a few allocations proportional to the
file's own size and always ends in :class:`WeightsError` naming the file.

We parse the header ourselves instead of using ``gguf.GGUFReader`` because the reader trusts
the counts it reads (a corrupt count becomes an IndexError or a huge numpy allocation) and builds
a numpy view per metadata element, which takes seconds on a 50k-token vocabulary. The ``gguf``
package is still our source of truth for type sizes, and the tests check our dequantisers
against its reference ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, NoReturn

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from levante.layers.block_quant import BlockQuant
from levante.loaders.errors import WeightsError

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS; ggml cannot represent more
_MAX_ELEMENTS = 2**63 - 1  # ggml counts elements in int64
_HEADER_BYTES = 4 + 4 + 8 + 8
# Smallest possible encodings, used to bound counts by the bytes left in the file.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset
_STRING_LEN_BYTES = 8
# Dequantise this many output elements at a time: big enough for torch's intra-op threads to
# pay off, small enough (1 MB of fp32 per temporary) that the temporaries stay in cache instead
# of costing several times the output's size on a 7B model's embedding. Measured: 1<<16 is
# ~30% slower, larger chunks no faster.
_CHUNK_ELEMENTS = 1 << 18

# struct format and byte size of each fixed-size metadata value type.
_SCALAR_FORMATS: Mapping[int, tuple[str, int]] = MappingProxyType(
    {
        GGUFValueType.UINT8: ("<B", 1),
        GGUFValueType.INT8: ("<b", 1),
        GGUFValueType.UINT16: ("<H", 2),
        GGUFValueType.INT16: ("<h", 2),
        GGUFValueType.UINT32: ("<I", 4),
        GGUFValueType.INT32: ("<i", 4),
        GGUFValueType.FLOAT32: ("<f", 4),
        GGUFValueType.BOOL: ("<B", 1),
        GGUFValueType.UINT64: ("<Q", 8),
        GGUFValueType.INT64: ("<q", 8),
        GGUFValueType.FLOAT64: ("<d", 8),
    }
)


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file and how to read it."""

    name: str
    shape: tuple[int, ...]  # PyTorch order: GGUF's ne[] reversed
    ggml_type: int  # a gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header; every failure names the file."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.path = path
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def fail(self, what: str) -> NoReturn:
        raise WeightsError(f"{self.path}: {what} (at byte {self.pos} of {len(self.buf)})")

    def advance(self, n: int, what: str) -> int:
        """Reserve ``n`` bytes and return where they start."""
        if n > self.remaining:
            self.fail(f"truncated GGUF file: {what} needs {n} bytes but only {self.remaining} remain")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.advance(size, what))[0]

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", 8, what))

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        start = self.advance(n, f"{what} ({n} bytes)")
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as exc:
            self.fail(f"{what} is not valid UTF-8 ({exc.reason})")


def _type_name(vtype: int) -> str:
    try:
        return GGUFValueType(vtype).name
    except ValueError:
        return f"unknown value type {vtype}"


def _read_array(cur: _Cursor, key: str) -> list[Any]:
    """Arrays always come back as Python lists (numbers, bools or strings), never numpy arrays."""
    etype = cur.u32(f"element type of array {key!r}")
    count = cur.u64(f"length of array {key!r}")
    if etype == GGUFValueType.STRING:
        if count > cur.remaining // _STRING_LEN_BYTES:
            cur.fail(
                f"array {key!r} claims {count} strings, more than the {cur.remaining} bytes left can hold"
            )
        return [cur.string(f"element of array {key!r}") for _ in range(count)]
    if etype not in _SCALAR_FORMATS:
        nested = "nested arrays are not allowed" if etype == GGUFValueType.ARRAY else _type_name(etype)
        cur.fail(f"array {key!r} has an invalid element type: {nested}")
    fmt, size = _SCALAR_FORMATS[etype]
    if count > cur.remaining // size:
        cur.fail(
            f"array {key!r} claims {count} elements of {size} bytes, more than the {cur.remaining} bytes left"
        )
    start = cur.advance(count * size, f"array {key!r}")
    values = np.frombuffer(cur.buf, dtype=np.dtype(fmt), count=count, offset=start)
    if etype == GGUFValueType.BOOL:
        if values.size and int(values.max()) > 1:
            cur.fail(f"array {key!r} holds a bool that is neither 0 nor 1")
        return values.astype(bool).tolist()
    return values.tolist()


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype == GGUFValueType.STRING:
        return cur.string(f"value of {key!r}")
    if vtype == GGUFValueType.ARRAY:
        return _read_array(cur, key)
    if vtype not in _SCALAR_FORMATS:
        cur.fail(f"metadata key {key!r} has {_type_name(vtype)}")
    value = cur.scalar(*_SCALAR_FORMATS[vtype], f"value of {key!r}")
    if vtype == GGUFValueType.BOOL:
        if value > 1:
            cur.fail(f"metadata key {key!r} holds a bool that is neither 0 nor 1 ({value})")
        return bool(value)
    return value


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    """Check magic and version and bound both counts by the file size; returns (version, n_tensors, n_kv)."""
    if len(cur.buf) == 0:
        cur.fail("empty file, not a GGUF model")
    magic = bytes(cur.buf[: min(4, len(cur.buf))])
    if magic != _MAGIC:
        cur.fail(f"not a GGUF file (starts with {magic!r}, expected {_MAGIC!r})")
    cur.advance(4, "magic")
    version = cur.u32("version")
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version == 1:
        cur.fail(
            "GGUF v1 is not supported (it used 32-bit counts); re-convert the model with a current llama.cpp"
        )
    if version not in _SUPPORTED_VERSIONS and swapped in _SUPPORTED_VERSIONS:
        cur.fail(f"big-endian GGUF v{swapped} is not supported; use the little-endian file")
    if version not in _SUPPORTED_VERSIONS:
        cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    if n_kv > cur.remaining // _MIN_KV_BYTES:
        cur.fail(f"metadata count {n_kv} cannot fit in the {cur.remaining} bytes after the header")
    room_for_tensors = cur.remaining - n_kv * _MIN_KV_BYTES
    if n_tensors > room_for_tensors // _MIN_TENSOR_INFO_BYTES:
        cur.fail(f"tensor count {n_tensors} cannot fit in the {cur.remaining} bytes after the header")
    return version, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], int]:
    """Returns the metadata and the data alignment it declares."""
    metadata: dict[str, Any] = {}
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cur.string("metadata key")
        if key in metadata:
            cur.fail(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"value type of {key!r}")
        metadata[key] = _read_value(cur, vtype, key)
        if key == "general.alignment":
            # llama.cpp only honours a u32 alignment; accepting other types would let us
            # disagree with it about where the tensor data starts.
            if vtype != GGUFValueType.UINT32:
                cur.fail(f"general.alignment must be uint32, got {_type_name(vtype)}")
            alignment = metadata[key]
            if alignment <= 0 or alignment & (alignment - 1):
                cur.fail(f"general.alignment must be a power of two, got {alignment}")
    return metadata, alignment


def _quant_sizes(cur: _Cursor, name: str, ggml_type: int) -> tuple[int, int]:
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        cur.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")


def _read_tensor_info(
    cur: _Cursor, alignment: int, file_size: int
) -> tuple[str, tuple[int, ...], int, int, int]:
    """Returns (name, torch shape, ggml type, offset relative to the data section, nbytes)."""
    name = cur.string("tensor name")
    n_dims = cur.u32(f"n_dims of tensor {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        cur.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {_MAX_DIMS}")
    ne = [cur.u64(f"dimension of tensor {name!r}") for _ in range(n_dims)]
    ggml_type = cur.u32(f"type of tensor {name!r}")
    offset = cur.u64(f"offset of tensor {name!r}")
    if any(d == 0 or d > _MAX_ELEMENTS for d in ne):
        cur.fail(f"tensor {name!r} has an invalid dimension in {ne}")
    n_elements = 1
    for d in ne:
        n_elements *= d
    if n_elements > _MAX_ELEMENTS:
        cur.fail(f"tensor {name!r} has an absurd shape {ne} ({n_elements} elements)")
    block_size, type_size = _quant_sizes(cur, name, ggml_type)
    type_name = GGMLQuantizationType(ggml_type).name
    if ne[0] % block_size:
        cur.fail(
            f"tensor {name!r} ({type_name}) has rows of {ne[0]}, not a multiple of the block size {block_size}"
        )
    nbytes = n_elements // block_size * type_size
    if nbytes > file_size:
        cur.fail(f"tensor {name!r} needs {nbytes} bytes, more than the whole file ({file_size})")
    if offset % alignment:
        cur.fail(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
    return name, tuple(reversed(ne)), ggml_type, offset, nbytes


def _read_tensor_table(cur: _Cursor, n_tensors: int, alignment: int) -> dict[str, GGUFTensorInfo]:
    file_size = len(cur.buf)
    entries = [_read_tensor_info(cur, alignment, file_size) for _ in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, ggml_type, offset, nbytes in entries:
        if name in tensors:
            cur.fail(f"duplicate tensor name {name!r}")
        start = data_start + offset
        if start + nbytes > file_size:
            cur.fail(
                f"tensor {name!r} data [{start}, {start + nbytes}) runs past the end of the file "
                f"({file_size} bytes): the file is truncated or the tensor table is corrupt"
            )
        tensors[name] = GGUFTensorInfo(name, shape, ggml_type, start, nbytes)
    by_offset = sorted(tensors.values(), key=lambda t: t.offset)
    for before, after in itertools.pairwise(by_offset):
        if before.offset + before.nbytes > after.offset:
            cur.fail(f"tensors {before.name!r} and {after.name!r} overlap")
    return tensors


# ---------------------------------------------------------------- dequantisers
# Each takes a contiguous uint8 [n_blocks, type_size] tensor and returns float32 [n_blocks, block_size].
# The arithmetic follows ggml's reference order (e.g. d * q - m, never fused) so results are
# bit-identical to gguf.quants.dequantize, which the tests check for every type.


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scale stored at byte ``start`` of each block, as float32 [n, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k]: ggml stores element j in the low nibble and j + k in the high one."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 8k] bits; bit j of the little-endian bitfield becomes element j."""
    return torch.stack([(qh >> i) & 1 for i in range(8)], dim=-1).flatten(-2)


def _deq_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float32)


def _deq_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float16).to(torch.float32)


def _deq_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.bfloat16).to(torch.float32)


def _deq_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).to(torch.float32) * _f16(blocks, 0)


def _deq_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:]).to(torch.float32) - 8
    return _f16(blocks, 0) * q


def _deq_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 4:]).to(torch.float32)
    return _f16(blocks, 0) * q + _f16(blocks, 2)


def _deq_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 6:]) | (_bits(blocks[:, 2:6]) << 4)
    return _f16(blocks, 0) * (q.to(torch.float32) - 16)


def _deq_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 8:]) | (_bits(blocks[:, 4:8]) << 4)
    return _f16(blocks, 0) * q.to(torch.float32) + _f16(blocks, 2)


def _deq_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # 16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit quants, d, dmin.
    n = blocks.shape[0]
    scales = blocks[:, :16]
    dl = (_f16(blocks, 80) * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (_f16(blocks, 82) * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    qs = blocks[:, 16:80].reshape(n, 2, 32)
    q = torch.stack([(qs >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(n, 16, 16)
    return (dl * q.to(torch.float32) - ml).reshape(n, 256)


def _deq_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # 32 bytes high-bit mask, 64 bytes of 2-bit quants, 12 bytes of 6-bit scales, d.
    n = blocks.shape[0]
    low, high = blocks[:, 96:104], blocks[:, 104:108]
    low_nibbles = torch.cat((low & 0x0F, low >> 4), dim=1)
    high_pairs = torch.cat([(high >> s) & 3 for s in (0, 2, 4, 6)], dim=1)
    scales = (low_nibbles | (high_pairs << 4)).to(torch.float32) - 32
    dl = (_f16(blocks, 108) * scales).view(n, 16, 1)
    qs = blocks[:, 32:96].reshape(n, 2, 32)
    ql = torch.stack([(qs >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(n, 16, 16)
    hmask = blocks[:, :32]
    qh = torch.stack([(hmask >> s) & 1 for s in range(8)], dim=1).reshape(n, 16, 16)
    # A set mask bit means "no offset"; a clear one subtracts 4.
    q = ql.to(torch.float32) - 4 * (1 - qh.to(torch.float32))
    return (dl * q).reshape(n, 256)


def _k_scales_mins(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: d, dmin and 12 bytes packing eight 6-bit scales and mins -> ([n, 8, 1], [n, 8, 1])."""
    n = blocks.shape[0]
    packed = blocks[:, 4:16].reshape(n, 3, 4)
    d, m, md = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    scale = (_f16(blocks, 0) * sc.to(torch.float32)).view(n, 8, 1)
    minimum = (_f16(blocks, 2) * mn.to(torch.float32)).view(n, 8, 1)
    return scale, minimum


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> [n, 8, 32]: each 32-byte run holds sub-block 2i in low nibbles, 2i + 1 in high."""
    runs = qs.reshape(qs.shape[0], 4, 32)
    return torch.stack((runs & 0x0F, runs >> 4), dim=2).reshape(qs.shape[0], 8, 32)


def _deq_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    scale, minimum = _k_scales_mins(blocks)
    q = _k_nibbles(blocks[:, 16:144]).to(torch.float32)
    return (scale * q - minimum).reshape(-1, 256)


def _deq_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scale, minimum = _k_scales_mins(blocks)
    qh = blocks[:, 16:48]
    high = torch.stack([(qh >> s) & 1 for s in range(8)], dim=1).reshape(n, 8, 32)
    q = (_k_nibbles(blocks[:, 48:176]) | (high << 4)).to(torch.float32)
    return (scale * q - minimum).reshape(n, 256)


def _deq_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d.
    n = blocks.shape[0]
    scale = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).to(torch.float32)).view(n, 16, 1)
    ql = blocks[:, :128].reshape(n, 2, 64)
    low = torch.stack((ql & 0x0F, ql >> 4), dim=2).reshape(n, 8, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 32)
    high = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.float32) - 32
    return (scale * q.reshape(n, 16, 16)).reshape(n, 256)


_DEQUANTISERS: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] = MappingProxyType(
    {
        GGMLQuantizationType.F32: _deq_f32,
        GGMLQuantizationType.F16: _deq_f16,
        GGMLQuantizationType.BF16: _deq_bf16,
        GGMLQuantizationType.Q8_0: _deq_q8_0,
        GGMLQuantizationType.Q4_0: _deq_q4_0,
        GGMLQuantizationType.Q4_1: _deq_q4_1,
        GGMLQuantizationType.Q5_0: _deq_q5_0,
        GGMLQuantizationType.Q5_1: _deq_q5_1,
        GGMLQuantizationType.Q2_K: _deq_q2_k,
        GGMLQuantizationType.Q3_K: _deq_q3_k,
        GGMLQuantizationType.Q4_K: _deq_q4_k,
        GGMLQuantizationType.Q5_K: _deq_q5_k,
        GGMLQuantizationType.Q6_K: _deq_q6_k,
    }
)

SUPPORTED_TYPES: frozenset[int] = frozenset(_DEQUANTISERS)


# ---------------------------------------------------------------- blocks of 32, as stored
# Types whose weights are w = d * q + m per block of 32 (q unsigned): each splitter returns
# (q uint8 [n, block_size], d and m float32 [n, block_size / 32]) for the block-quantised kernels,
# which then use the file's own values (layers/block_quant.py). The bit width is the storage the
# kernel needs: 4 for q <= 15, else 8.


def _split_q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = (blocks[:, 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    d = _f16(blocks, 0)
    return q, d, -128 * d


def _split_q4_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(blocks, 0)
    return _nibbles(blocks[:, 2:]), d, -8 * d


def _split_q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _nibbles(blocks[:, 4:]), _f16(blocks, 0), _f16(blocks, 2)


def _split_q5_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(blocks, 0)
    return _nibbles(blocks[:, 6:]) | (_bits(blocks[:, 2:6]) << 4), d, -16 * d


def _split_q5_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _nibbles(blocks[:, 8:]) | (_bits(blocks[:, 4:8]) << 4), _f16(blocks, 0), _f16(blocks, 2)


def _split_q4_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale, minimum = _k_scales_mins(blocks)
    return _k_nibbles(blocks[:, 16:144]).reshape(-1, 256), scale.squeeze(-1), -minimum.squeeze(-1)


def _split_q5_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = blocks.shape[0]
    scale, minimum = _k_scales_mins(blocks)
    qh = blocks[:, 16:48]
    high = torch.stack([(qh >> s) & 1 for s in range(8)], dim=1).reshape(n, 8, 32)
    q = _k_nibbles(blocks[:, 48:176]) | (high << 4)
    return q.reshape(n, 256), scale.squeeze(-1), -minimum.squeeze(-1)


BlockSplitter = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

# ggml type -> (splitter, bits of the kernel's storage)
_BLOCK_SPLITTERS: Mapping[int, tuple[BlockSplitter, int]] = MappingProxyType(
    {
        GGMLQuantizationType.Q8_0: (_split_q8_0, 8),
        GGMLQuantizationType.Q4_0: (_split_q4_0, 4),
        GGMLQuantizationType.Q4_1: (_split_q4_1, 4),
        GGMLQuantizationType.Q5_0: (_split_q5_0, 8),
        GGMLQuantizationType.Q5_1: (_split_q5_1, 8),
        GGMLQuantizationType.Q4_K: (_split_q4_k, 4),
        GGMLQuantizationType.Q5_K: (_split_q5_k, 8),
    }
)


class GGUFFile:
    """A parsed, validated, memory-mapped GGUF file.

    ``metadata`` maps each key to a Python value: ``str``, ``int``, ``float``, ``bool`` or a
    ``list`` of those (arrays, including the tokenizer's large token/score arrays, are always
    plain lists). Tensor bytes stay on disk until :meth:`raw` or :meth:`load` touches them.

    >>> with GGUFFile("model.gguf") as f:                          # doctest: +SKIP
    ...     f.tensors["token_embd.weight"].shape                   # (vocab, hidden)
    ...     w = f.load("token_embd.weight", torch.bfloat16)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: no such GGUF file")
        if self.path.stat().st_size == 0:
            raise WeightsError(f"{self.path}: empty file, not a GGUF model")
        try:
            self._data: np.memmap[Any, np.dtype[np.uint8]] | None = np.memmap(
                self.path, dtype=np.uint8, mode="r"
            )
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{self.path}: cannot map file: {exc}") from exc
        try:
            cur = _Cursor(self._data.data, self.path)
            self.version, n_tensors, n_kv = _read_header(cur)
            self.metadata, self._alignment = _read_metadata(cur, n_kv)
            self.tensors = _read_tensor_table(cur, n_tensors, self._alignment)
        except BaseException:
            self.close()
            raise

    def _mapped(self) -> np.memmap[Any, np.dtype[np.uint8]]:
        if self._data is None:
            raise ValueError(f"{self.path}: GGUF file is closed")
        return self._data

    def _info(self, name: str) -> GGUFTensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise WeightsError(f"{self.path}: no tensor named {name!r}")
        return info

    def raw(self, name: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """The tensor's bytes as a read-only uint8 view of the mapping (no copy)."""
        info = self._info(name)
        return self._mapped()[info.offset : info.offset + info.nbytes]

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantise ``name`` into a new CPU tensor of ``dtype`` with shape ``tensors[name].shape``.

        The result never aliases the file mapping, so callers may modify it in place.
        """
        info = self._info(name)
        dequantise = _DEQUANTISERS.get(info.ggml_type)
        if dequantise is None:
            supported = ", ".join(GGMLQuantizationType(t).name for t in _DEQUANTISERS)
            type_name = GGMLQuantizationType(info.ggml_type).name
            raise WeightsError(
                f"{self.path}: tensor {name!r} has type {type_name}, which levante cannot load (supported: {supported})"
            )
        if not dtype.is_floating_point:
            raise ValueError(f"load() produces floating-point tensors, not {dtype}")
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
        raw = self.raw(name)
        n_blocks = info.nbytes // type_size
        out = torch.empty(n_blocks * block_size, dtype=dtype)
        step = max(1, _CHUNK_ELEMENTS // block_size)
        for first in range(0, n_blocks, step):
            last = min(n_blocks, first + step)
            # Copy the quantised bytes out of the read-only mapping: torch cannot wrap read-only
            # memory safely, and the copy is small next to the dequantised output.
            chunk = torch.from_numpy(raw[first * type_size : last * type_size].copy()).view(
                last - first, type_size
            )
            out[first * block_size : last * block_size] = dequantise(chunk).reshape(-1)
        return out.view(info.shape)

    def load_blocks(self, name: str) -> BlockQuant | None:
        """The tensor's blocks as stored (w = d * q + m per 32 inputs of a row), or None for other types.

        ``q`` has the tensor's shape; ``d`` and ``m`` its shape with the last dimension divided by 32.
        """
        info = self._info(name)
        entry = _BLOCK_SPLITTERS.get(info.ggml_type)
        if entry is None or len(info.shape) < 2:
            return None
        split, bits = entry
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
        raw = self.raw(name)
        n_blocks = info.nbytes // type_size
        q = torch.empty(n_blocks, block_size, dtype=torch.uint8)
        d = torch.empty(n_blocks, block_size // 32)
        m = torch.empty(n_blocks, block_size // 32)
        step = max(1, _CHUNK_ELEMENTS // block_size)
        for first in range(0, n_blocks, step):
            last = min(n_blocks, first + step)
            chunk = torch.from_numpy(raw[first * type_size : last * type_size].copy()).view(last - first, type_size)
            q[first:last], d[first:last], m[first:last] = split(chunk)
        groups = (*info.shape[:-1], info.shape[-1] // 32)
        return BlockQuant(q.view(info.shape), d.view(groups), m.view(groups), bits)

    def close(self) -> None:
        """Drop our mapping. Arrays returned by :meth:`raw` keep it alive until they are freed."""
        self._data = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

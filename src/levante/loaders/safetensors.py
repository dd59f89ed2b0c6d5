"""Find a model directory's safetensors files, validate them, and stream their tensors lazily.

A safetensors file is::

    u64 little-endian N | N bytes of JSON header | data section

and the header maps each tensor name to ``{"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}``
(offsets relative to the data section), plus an optional ``"__metadata__"`` of string pairs.
The tensors must tile the data section exactly: sorted by offset, no gaps, no overlap, nothing
after the last one. :func:`read_header` checks all of that in Python before the ``safetensors``
library sees the file, so a truncated download or a corrupt header becomes a
:class:`WeightsError` naming the file instead of a ``SafetensorError`` (or worse) deep in loading.

Pickle checkpoints (``pytorch_model.bin`` and friends) are refused outright: unpickling runs
arbitrary code, and a model server must never do that with a file it was handed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError, safe_open

from levante.loaders.errors import WeightsError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
# Same cap the safetensors library applies; also bounds what a bogus length makes us read.
_MAX_HEADER_BYTES = 100_000_000
_MAX_INDEX_BYTES = 100_000_000
# Bytes per element of every byte-aligned safetensors dtype. Sub-byte types (F4, F6_*) are not
# used by the models we serve, so they are rejected rather than half-supported.
_DTYPE_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "BOOL": 1,
        "U8": 1,
        "I8": 1,
        "F8_E5M2": 1,
        "F8_E4M3": 1,
        "F8_E8M0": 1,
        "I16": 2,
        "U16": 2,
        "F16": 2,
        "BF16": 2,
        "I32": 4,
        "U32": 4,
        "F32": 4,
        "I64": 8,
        "U64": 8,
        "F64": 8,
        "C64": 8,
    }
)


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor as described by a safetensors header (offsets relative to the data section)."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int


def _fail(path: Path, what: str) -> NoReturn:
    raise WeightsError(f"{path}: {what}")


def refuse_pickle(path: Path) -> None:
    """Raise WeightsError if ``path`` is a pickle checkpoint (by suffix); do nothing otherwise."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _fail(
            path,
            f"refusing to load a pickle checkpoint ({path.suffix}): unpickling can execute arbitrary code. "
            "Convert it to safetensors in a trusted environment (for a transformers model: "
            "save_pretrained(..., safe_serialization=True)) and import that instead.",
        )


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json ``object_pairs_hook`` that rejects duplicate keys instead of silently keeping the last."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_json(path: Path, raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_json_object)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and our duplicate-key check;
    # RecursionError is what a deeply nested header ("[[[[...") costs json.
    except (ValueError, RecursionError) as exc:
        _fail(path, f"{what} is not valid JSON: {exc}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, spec: Any) -> SafetensorsEntry:
    if not isinstance(spec, dict):
        _fail(path, f"header entry for tensor {name!r} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        _fail(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        _fail(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        _fail(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * _DTYPE_SIZES[dtype]
    if end - begin != expected:
        _fail(
            path,
            f"tensor {name!r} ({dtype} {shape}) needs {expected} bytes but its data_offsets span {end - begin}",
        )
    return SafetensorsEntry(name, dtype, tuple(shape), begin, end)


def _header_length(path: Path, prefix: bytes, size: int) -> int:
    if len(prefix) < 8:
        _fail(path, f"truncated safetensors file: {size} bytes is too short for the 8-byte header length")
    n = int.from_bytes(prefix, "little")
    if n > size - 8:
        # torch.save writes a zip ("PK\3\4") or a raw pickle (0x80, protocol byte); read as a length
        # both are absurd, so only then is sniffing them unambiguous (0x80 is a fine low length byte).
        if prefix.startswith(b"PK\x03\x04") or (prefix[0] == 0x80 and 2 <= prefix[1] <= 5):
            _fail(
                path,
                "this is a pickle checkpoint (torch.save format), not safetensors; refusing to unpickle it",
            )
        _fail(
            path,
            f"header length {n} is larger than the rest of the file ({size - 8} bytes): truncated or corrupt",
        )
    if n > _MAX_HEADER_BYTES:
        _fail(path, f"header length {n} exceeds the {_MAX_HEADER_BYTES}-byte limit")
    return n


def _read_header_bytes(path: Path) -> tuple[bytes, int]:
    """Returns the raw JSON header and the size of the data section after it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            n = _header_length(path, fh.read(8), size)
            raw = fh.read(n)
    except OSError as exc:
        _fail(path, f"cannot read safetensors file: {exc}")
    if len(raw) != n:
        _fail(path, "file shrank while its header was being read")
    return raw, size - 8 - n


def read_header(path: Path) -> dict[str, SafetensorsEntry]:
    """Validate ``path``'s header against the file and return its tensors in data order.

    Raises WeightsError (naming the file) for anything the safetensors library would reject, so a
    file that passes here opens cleanly with ``safe_open``.
    """
    raw, data_size = _read_header_bytes(path)
    if not raw.startswith(b"{"):  # the safetensors library insists on this too
        _fail(path, f"header does not start with '{{' (starts with {raw[:16]!r}): not a safetensors file")
    header = _parse_json(path, raw, "header")
    if not isinstance(header, dict):
        _fail(path, "header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        _fail(path, "__metadata__ must map strings to strings")
    entries = sorted(
        (_entry(path, name, spec) for name, spec in header.items()), key=lambda e: (e.begin, e.end)
    )
    position = 0
    for entry in entries:
        if entry.begin != position:
            problem = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            _fail(path, f"tensor {entry.name!r} at data offset {entry.begin} {problem} (expected {position})")
        position = entry.end
    if position > data_size:
        _fail(path, f"truncated: tensors need {position} data bytes but the file holds {data_size}")
    if position < data_size:
        _fail(path, f"{data_size - position} unexpected bytes after the last tensor")
    return {entry.name: entry for entry in entries}


def _shard_names(index: Path) -> dict[str, list[str]]:
    """Parse an index's weight_map into shard file name -> tensor names."""
    try:
        if index.stat().st_size > _MAX_INDEX_BYTES:
            _fail(index, f"index is larger than {_MAX_INDEX_BYTES} bytes")
        raw = index.read_bytes()
    except OSError as exc:
        _fail(index, f"cannot read index: {exc}")
    parsed = _parse_json(index, raw, "index")
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        _fail(index, "index has no weight_map object mapping tensor names to shard files")
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            _fail(index, f"weight_map entry for {tensor!r} is not a file name: {shard!r}")
        shards.setdefault(shard, []).append(tensor)
    return shards


def _check_shard(index: Path, shard: str) -> Path:
    # Only bare file names: the index comes from whoever published the model, and "../" or an
    # absolute path would let it point us anywhere. We check the name rather than resolving it
    # because HF cache snapshots are symlinks into ../../blobs, which resolve outside the folder.
    if not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
        _fail(index, f"shard name {shard!r} is not a plain file name in the model folder")
    path = index.parent / shard
    refuse_pickle(path)
    if path.suffix != ".safetensors":
        _fail(index, f"shard {shard!r} is not a .safetensors file")
    if not path.is_file():
        _fail(index, f"shard {shard!r} does not exist in {index.parent}")
    return path


def _files_from_index(index: Path) -> list[Path]:
    files = []
    for shard, tensors in sorted(_shard_names(index).items()):
        path = _check_shard(index, shard)
        missing = [t for t in tensors if t not in read_header(path)]
        if missing:
            _fail(
                path,
                f"shard lacks {len(missing)} tensors that {index.name} assigns to it, e.g. {missing[0]!r}",
            )
        files.append(path)
    return files


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding a HF-format model's weights, validated.

    Either ``model.safetensors.index.json``'s shards (sorted, each checked to exist, to be a
    plain file name and to hold the tensors the index assigns it) or ``model.safetensors``.
    """
    if not model_dir.is_dir():
        _fail(model_dir, "model folder does not exist or is not a directory")
    index = model_dir / INDEX_FILE
    if index.is_file():
        return _files_from_index(index)
    single = model_dir / SINGLE_FILE
    if single.is_file():
        read_header(single)
        return [single]
    present = sorted(p for p in model_dir.iterdir() if p.is_file())
    others = [p.name for p in present if p.suffix == ".safetensors"]
    if others:
        _fail(model_dir, f"no {SINGLE_FILE} or {INDEX_FILE}; found only {', '.join(others)}")
    pickles = [p for p in present if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        refuse_pickle(pickles[0])
    _fail(model_dir, f"no weights found: expected {SINGLE_FILE} or {INDEX_FILE}")


def _open(path: Path, device: str) -> Any:
    try:
        return safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as exc:
        _fail(path, f"safetensors could not open the file: {exc}")


def iter_safetensors(
    files: Sequence[Path], device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor in ``files``, one at a time, memory-mapped.

    All headers are validated (and names checked unique across files) before the first tensor is
    yielded, so a bad last shard fails fast instead of after minutes of loading.
    """
    headers = [(Path(f), read_header(Path(f))) for f in files]
    owner: dict[str, Path] = {}
    for path, entries in headers:
        for name in entries:
            if name in owner:
                _fail(path, f"tensor {name!r} also appears in {owner[name]}")
            owner[name] = path
    for path, entries in headers:
        with _open(path, str(device)) as handle:
            for name in entries:  # data order, so the mapping is read front to back
                try:
                    tensor = handle.get_tensor(name)
                except SafetensorError as exc:
                    _fail(path, f"cannot read tensor {name!r}: {exc}")
                yield name, tensor

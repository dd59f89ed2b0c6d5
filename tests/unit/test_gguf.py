"""GGUFFile against llama.cpp's own gguf package: same metadata, same shapes, same dequantised values;
and every way a file can be broken ends in WeightsError naming it, cheaply."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from levante.loaders.errors import WeightsError
from levante.loaders.gguf import SUPPORTED_TYPES, GGUFFile
from levante.loaders.loader import packaged_model_path

T = GGMLQuantizationType
QUANTISED = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
FLOATS = [T.F32, T.F16, T.BF16]
# Types gguf.quants.quantize can produce; the K-quants it can only dequantise.
QUANTISABLE = [T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
# Byte offsets of the fp16 scale fields inside one block of each quantised type; random bytes
# there would mostly decode to huge values or NaN, so tests put real fp16 numbers in them.
FP16_FIELDS: dict[int, tuple[int, ...]] = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
SHAPES = [(512,), (3, 512), (2, 3, 256), (2, 1, 2, 256)]
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_gguf(path: Path, fill: Callable[[gguf.GGUFWriter], None]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_blocks(rng: np.random.Generator, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """Random bytes in the byte shape of a ``qtype`` tensor of ``shape``, with valid fp16 scales."""
    block_size, type_size = GGML_QUANT_SIZES[T(qtype)]
    byte_shape = (*shape[:-1], shape[-1] // block_size * type_size)
    data = rng.integers(0, 256, size=byte_shape, dtype=np.uint8)
    blocks = data.reshape(-1, type_size)
    for start in FP16_FIELDS.get(qtype, ()):
        scales = rng.standard_normal((blocks.shape[0], 1)).astype(np.float16)
        blocks[:, start : start + 2] = scales.view(np.uint8)
    return data


def quantised(rng: np.random.Generator, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    values = rng.standard_normal(shape).astype(np.float32)
    if qtype == T.F32:
        return values
    if qtype == T.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, T(qtype))


def assert_matches_reference(path: Path) -> None:
    """Every tensor: our shape == the reference's dequantised shape == ne reversed; values identical."""
    reader = gguf.GGUFReader(path)
    with GGUFFile(path) as ours:
        assert list(ours.tensors) == [t.name for t in reader.tensors]
        for ref in reader.tensors:
            info = ours.tensors[ref.name]
            assert info.ggml_type == ref.tensor_type
            assert info.offset == ref.data_offset and info.nbytes == ref.n_bytes
            assert bytes(ours.raw(ref.name)) == ref.data.tobytes()
            with np.errstate(all="ignore"):
                expected = gguf.quants.dequantize(ref.data, ref.tensor_type)
            got = ours.load(ref.name)
            assert got.dtype == torch.float32
            assert tuple(got.shape) == info.shape == expected.shape == tuple(reversed(ref.shape.tolist()))
            np.testing.assert_array_equal(got.numpy(), expected, err_msg=ref.name)


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("qtype", FLOATS + QUANTISED, ids=lambda t: T(t).name)
def test_random_blocks_dequantise_like_reference(tmp_path: Path, qtype: int) -> None:
    rng = np.random.default_rng(qtype)

    def fill(w: gguf.GGUFWriter) -> None:
        for i, shape in enumerate(SHAPES):
            w.add_tensor(f"t{i}", random_blocks(rng, qtype, shape), raw_dtype=T(qtype))

    assert_matches_reference(write_gguf(tmp_path / "random.gguf", fill))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, *QUANTISABLE], ids=lambda t: T(t).name)
def test_quantised_tensors_dequantise_like_reference(tmp_path: Path, qtype: int) -> None:
    rng = np.random.default_rng(100 + qtype)

    def fill(w: gguf.GGUFWriter) -> None:
        for i, shape in enumerate(SHAPES):
            data = quantised(rng, qtype, shape)
            raw_dtype = None if qtype in (T.F32, T.F16) else T(qtype)
            w.add_tensor(f"blk.{i}.weight", data, raw_dtype=raw_dtype)

    assert_matches_reference(write_gguf(tmp_path / "quantised.gguf", fill))


def test_every_listed_type_is_supported() -> None:
    assert set(FLOATS + QUANTISED) == SUPPORTED_TYPES


def test_load_in_other_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    path = write_gguf(
        tmp_path / "dtypes.gguf",
        lambda w: w.add_tensor("w", quantised(rng, T.Q4_1, (4, 64)), raw_dtype=T.Q4_1),
    )
    with GGUFFile(path) as f:
        full = f.load("w")
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            got = f.load("w", dtype)
            assert got.dtype == dtype and torch.equal(got, full.to(dtype))
        with pytest.raises(ValueError, match="floating-point"):
            f.load("w", torch.int32)


def test_load_spans_many_chunks(tmp_path: Path) -> None:
    """A tensor larger than one dequantisation chunk comes out whole and in order."""
    rng = np.random.default_rng(8)
    shape = (40, 32 * 1024)  # 1.3M elements: more than one chunk
    path = write_gguf(
        tmp_path / "big.gguf",
        lambda w: w.add_tensor("w", random_blocks(rng, T.Q8_0, shape), raw_dtype=T.Q8_0),
    )
    assert_matches_reference(path)


def test_result_is_writable_and_independent_of_the_file(tmp_path: Path) -> None:
    values = np.arange(64, dtype=np.float32).reshape(2, 32)
    path = write_gguf(tmp_path / "f32.gguf", lambda w: w.add_tensor("w", values))
    with GGUFFile(path) as f:
        got = f.load("w")
        got += 1  # must not touch the read-only mapping
        assert torch.equal(f.load("w"), torch.from_numpy(values))
        raw = f.raw("w")
        assert not raw.flags.writeable and raw.dtype == np.uint8


def test_unsupported_type_loads_raw_but_not_dequantised(tmp_path: Path) -> None:
    def fill(w: gguf.GGUFWriter) -> None:
        w.add_tensor("ids", np.arange(8, dtype=np.int32))
        w.add_tensor("iq", np.zeros((1, GGML_QUANT_SIZES[T.IQ2_XXS][1]), dtype=np.uint8), raw_dtype=T.IQ2_XXS)

    path = write_gguf(tmp_path / "unsupported.gguf", fill)
    with GGUFFile(path) as f:
        assert f.raw("ids").view(np.int32).tolist() == list(range(8))
        for name, type_name in (("ids", "I32"), ("iq", "IQ2_XXS")):
            with pytest.raises(WeightsError, match=type_name) as exc:
                f.load(name)
            assert name in str(exc.value) and path.name in str(exc.value)
        with pytest.raises(WeightsError, match="no tensor named"):
            f.raw("missing")
    with pytest.raises(ValueError, match="closed"):
        f.raw("ids")


# ------------------------------------------------------------------ metadata


def test_metadata_of_every_type_matches_reader(tmp_path: Path) -> None:
    numeric: dict[GGUFValueType, list[Any]] = {
        GGUFValueType.UINT8: [0, 255],
        GGUFValueType.INT8: [-128, 127],
        GGUFValueType.UINT16: [0, 65535],
        GGUFValueType.INT16: [-32768, 32767],
        GGUFValueType.UINT32: [0, 2**32 - 1],
        GGUFValueType.INT32: [-(2**31), 2**31 - 1],
        GGUFValueType.UINT64: [0, 2**64 - 1],
        GGUFValueType.INT64: [-(2**63), 2**63 - 1],
        GGUFValueType.FLOAT32: [0.1, -3.0e38],
        GGUFValueType.FLOAT64: [0.1, 1e300],
        GGUFValueType.BOOL: [True, False],
    }

    def fill(w: gguf.GGUFWriter) -> None:
        for vtype, values in numeric.items():
            w.add_key_value(f"scalar.{vtype.name}", values[-1], vtype)
            w.add_key_value(f"array.{vtype.name}", values, GGUFValueType.ARRAY, sub_type=vtype)
        w.add_string("text.plain", "héllo {{ jinja }} \n")
        w.add_array("text.list", ["<s>", "", "▁the", "日本"])
        w.add_custom_alignment(64)
        w.add_tensor("w", np.ones((2, 32), dtype=np.float32))

    path = write_gguf(tmp_path / "meta.gguf", fill)
    reader = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        keys = [k for k in reader.fields if not k.startswith("GGUF.")]
        assert list(f.metadata) == keys
        for key in keys:
            assert f.metadata[key] == reader.fields[key].contents(), key
        assert f.version == 3
        assert f.metadata["scalar.BOOL"] is False
        assert f.metadata["array.BOOL"] == [True, False]
        assert f.metadata["array.FLOAT32"][0] == float(np.float32(0.1))
        assert f.metadata["scalar.UINT64"] == 2**64 - 1
        assert all(isinstance(f.metadata[k], list) for k in keys if k.startswith(("array.", "text.list")))
        assert f.tensors["w"].offset % 64 == 0
        assert torch.equal(f.load("w"), torch.ones(2, 32))


# ------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def smollm2() -> Iterator[tuple[GGUFFile, gguf.GGUFReader]]:
    path = packaged_model_path("smollm2")
    with GGUFFile(path) as f:
        yield f, gguf.GGUFReader(path)


@pytest.mark.slow
def test_smollm2_parses_and_every_tensor_loads(smollm2: tuple[GGUFFile, gguf.GGUFReader]) -> None:
    f, reader = smollm2
    assert f.metadata["general.architecture"] == "llama"
    assert f.metadata["llama.block_count"] == 30
    assert (f.metadata["llama.attention.head_count"], f.metadata["llama.attention.head_count_kv"]) == (9, 3)
    assert f.tensors["token_embd.weight"].shape == (49152, 576)
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(f.tensors) == len(reader.tensors) == 272
    for ref in reader.tensors:
        got = f.load(ref.name)
        assert tuple(got.shape) == f.tensors[ref.name].shape == tuple(reversed(ref.shape.tolist()))
        assert bool(torch.isfinite(got).all()), ref.name


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight"]
)
def test_smollm2_tensors_equal_reference(smollm2: tuple[GGUFFile, gguf.GGUFReader], name: str) -> None:
    f, reader = smollm2
    ref = next(t for t in reader.tensors if t.name == name)
    expected = gguf.quants.dequantize(ref.data, ref.tensor_type)
    np.testing.assert_array_equal(f.load(name).numpy(), expected)


@pytest.mark.slow
def test_smollm2_metadata_equals_reference(smollm2: tuple[GGUFFile, gguf.GGUFReader]) -> None:
    f, reader = smollm2
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert f.metadata[key] == field.contents(), key


# ------------------------------------------------------------------ broken files


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def tensor(name: str, ne: list[int], ggml_type: int = T.F32, offset: int = 0) -> bytes:
    return s(name) + u32(len(ne)) + b"".join(u64(d) for d in ne) + u32(ggml_type) + u64(offset)


def gguf_bytes(
    kvs: Sequence[bytes] = (),
    tensors: Sequence[bytes] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
) -> bytes:
    """Hand-assembled GGUF, so tests can write what no well-behaved writer would."""
    head = b"GGUF" + u32(version) + u64(len(tensors) if n_tensors is None else n_tensors)
    body = head + u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % alignment) + data


F32_ROW = np.arange(8, dtype=np.float32).tobytes()  # 32 bytes: one aligned tensor of ne=[8]
ALIGN_48 = kv("general.alignment", GGUFValueType.UINT32, u32(48))

BAD_FILES: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "empty"),
    "short-magic": (b"GGU", "not a GGUF file"),
    "wrong-magic": (b"GGML" + bytes(40), "not a GGUF file"),
    "version-1": (gguf_bytes(version=1), "v1"),
    "version-4": (gguf_bytes(version=4), "unsupported GGUF version 4"),
    "big-endian": (b"GGUF" + struct.pack(">I", 3) + bytes(16), "big-endian"),
    "header-only-half": (b"GGUF" + u32(3) + u64(0), "truncated"),
    "absurd-tensor-count": (gguf_bytes(n_tensors=2**62), "tensor count"),
    "absurd-kv-count": (gguf_bytes(n_kv=2**62), "metadata count"),
    "kv-count-past-end": (
        b"GGUF" + u32(3) + u64(0) + u64(3) + kv("a", GGUFValueType.UINT8, b"\1"),
        "metadata count",
    ),
    "absurd-key-length": (gguf_bytes([u64(2**60) + b"xx" + bytes(16)]), "truncated"),
    "absurd-string-value": (gguf_bytes([kv("k", GGUFValueType.STRING, u64(2**63))]), "truncated"),
    "absurd-array-length": (
        gguf_bytes([kv("k", GGUFValueType.ARRAY, u32(GGUFValueType.UINT32) + u64(2**61))]),
        "claims",
    ),
    "absurd-string-array": (
        gguf_bytes([kv("k", GGUFValueType.ARRAY, u32(GGUFValueType.STRING) + u64(2**61))]),
        "claims",
    ),
    "nested-array": (
        gguf_bytes([kv("k", GGUFValueType.ARRAY, u32(GGUFValueType.ARRAY) + u64(1) + u32(0) + u64(0))]),
        "nested",
    ),
    "unknown-value-type": (gguf_bytes([kv("k", 99, u32(0))]), "unknown value type 99"),
    "unknown-array-type": (
        gguf_bytes([kv("k", GGUFValueType.ARRAY, u32(77) + u64(1) + u32(0))]),
        "invalid element type",
    ),
    "bad-bool": (gguf_bytes([kv("k", GGUFValueType.BOOL, b"\2")]), "bool"),
    "bad-utf8-key": (gguf_bytes([kv(b"\xff\xfe", GGUFValueType.UINT8, b"\1")]), "UTF-8"),
    "duplicate-key": (gguf_bytes([kv("k", GGUFValueType.UINT8, b"\1")] * 2), "duplicate metadata key"),
    "alignment-not-power-of-two": (gguf_bytes([ALIGN_48]), "power of two"),
    "alignment-zero": (gguf_bytes([kv("general.alignment", GGUFValueType.UINT32, u32(0))]), "power of two"),
    "alignment-wrong-type": (gguf_bytes([kv("general.alignment", GGUFValueType.UINT64, u64(32))]), "uint32"),
    "too-many-dims": (gguf_bytes(tensors=[tensor("t", [1, 1, 1, 1, 8])], data=F32_ROW), "dimensions"),
    "zero-dims": (gguf_bytes(tensors=[tensor("t", [])], data=F32_ROW), "dimensions"),
    "zero-size-dim": (gguf_bytes(tensors=[tensor("t", [8, 0])], data=F32_ROW), "invalid dimension"),
    "absurd-shape": (gguf_bytes(tensors=[tensor("t", [2**40, 2**40])], data=F32_ROW), "absurd shape"),
    "huge-tensor": (
        gguf_bytes(tensors=[tensor("t", [2**20, 2**20])], data=F32_ROW),
        "more than the whole file",
    ),
    "unknown-ggml-type": (gguf_bytes(tensors=[tensor("t", [8], 99)], data=F32_ROW), "unknown ggml type 99"),
    "removed-ggml-type": (gguf_bytes(tensors=[tensor("t", [32], 4)], data=F32_ROW), "unknown ggml type 4"),
    "row-not-whole-blocks": (
        gguf_bytes(tensors=[tensor("t", [48], T.Q4_0)], data=bytes(64)),
        "block size 32",
    ),
    "offset-past-end": (gguf_bytes(tensors=[tensor("t", [8], offset=1 << 20)], data=F32_ROW), "past the end"),
    "offset-unaligned": (
        gguf_bytes(tensors=[tensor("t", [4], offset=4)], data=F32_ROW),
        "not a multiple of the alignment",
    ),
    "data-missing": (gguf_bytes(tensors=[tensor("t", [8])]), "past the end"),
    "duplicate-tensor": (
        gguf_bytes(tensors=[tensor("t", [8]), tensor("t", [8], offset=32)], data=F32_ROW * 2),
        "duplicate tensor",
    ),
    "overlapping-tensors": (
        gguf_bytes(tensors=[tensor("a", [8]), tensor("b", [16])], data=F32_ROW * 2),
        "overlap",
    ),
}


def open_frugally(path: Path) -> WeightsError:
    """Open ``path`` expecting WeightsError; the attempt must not allocate more than a few MB."""
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError) as exc:
            GGUFFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak} bytes"
    assert path.name in str(exc.value)
    return exc.value


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_raises_weights_error(tmp_path: Path, case: str) -> None:
    content, message = BAD_FILES[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(content)
    assert message in str(open_frugally(path))


def test_hand_built_file_is_valid(tmp_path: Path) -> None:
    """The builder used for the bad files produces files both readers accept."""
    path = tmp_path / "good.gguf"
    path.write_bytes(gguf_bytes([kv("k", GGUFValueType.UINT8, b"\1")], [tensor("t", [8])], F32_ROW))
    assert_matches_reference(path)
    assert GGUFFile(path).metadata == {"k": 1}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"nowhere\.gguf"):
        GGUFFile(tmp_path / "nowhere.gguf")
    with pytest.raises(WeightsError, match="no such GGUF file"):
        GGUFFile(tmp_path)


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    rng = np.random.default_rng(3)

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_string("general.name", "sample")
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
        w.add_array("tokenizer.ggml.scores", [0.5, 0.25, 0.125])
        w.add_tensor("blk.0.weight", random_blocks(rng, T.Q4_0, (2, 64)), raw_dtype=T.Q4_0)
        w.add_tensor("blk.1.weight", rng.standard_normal((4, 8)).astype(np.float32))

    path = write_gguf(tmp_path_factory.mktemp("sample") / "sample.gguf", fill)
    return path.read_bytes()


def test_truncation_anywhere_is_refused(tmp_path: Path, sample_file: bytes) -> None:
    """The sample's last tensor ends exactly at EOF, so every proper prefix is a broken file."""
    cuts = [*range(1, 200), *range(200, len(sample_file), 7), len(sample_file) - 1]
    path = tmp_path / "cut.gguf"
    for cut in cuts:
        path.write_bytes(sample_file[:cut])
        with pytest.raises(WeightsError) as exc:
            GGUFFile(path)
        assert "cut.gguf" in str(exc.value), cut


def test_named_truncation_points(tmp_path: Path, sample_file: bytes) -> None:
    cuts = {
        "header": 20,
        "metadata": sample_file.index(b"sample") + 3,
        "tensor-table": sample_file.index(b"blk.0.weight") + 2,
        "data": len(sample_file) - 5,
    }
    for where, cut in cuts.items():
        path = tmp_path / f"truncated-in-{where}.gguf"
        path.write_bytes(sample_file[:cut])
        message = str(open_frugally(path))
        assert "truncated" in message, message


def test_corrupted_bytes_never_escape_as_other_errors(tmp_path: Path, sample_file: bytes) -> None:
    """Overwrite random header bytes: the file either still parses or fails with WeightsError."""
    rng = np.random.default_rng(11)
    header_end = sample_file.index(b"blk.1.weight") + 40
    path = tmp_path / "fuzz.gguf"
    for _ in range(2000):
        data = bytearray(sample_file)
        for pos in rng.integers(0, header_end, size=rng.integers(1, 4)):
            data[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            with GGUFFile(path) as f:
                for name in f.tensors:
                    f.raw(name)
        except WeightsError as exc:
            assert "fuzz.gguf" in str(exc)

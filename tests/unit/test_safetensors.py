"""Safetensors discovery and loading: good folders load the right tensors; broken, unsafe or
tampered ones raise WeightsError naming the offending file before safetensors sees them."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from levante.loaders.errors import WeightsError
from levante.loaders.safetensors import iter_safetensors, read_header, refuse_pickle, safetensors_files


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=gen, dtype=torch.float32),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=gen).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=gen).to(torch.float16),
        "model.rotary.inv_freq": torch.arange(4, dtype=torch.int64),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
    }


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def write_raw(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file with an arbitrary header (dict -> JSON, bytes as given)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in halves.items():
        save_file({n: tensors[n] for n in shard_names}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, shard))
    write_index(folder, weight_map)
    return weight_map


def write_index(folder: Path, weight_map: dict[str, str]) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


# ------------------------------------------------------------------ good folders


def test_single_file(tmp_path: Path) -> None:
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = safetensors_files(tmp_path)
    assert files == [tmp_path / "model.safetensors"]
    assert_same(dict(iter_safetensors(files)), tensors)


def test_sharded_folder(tmp_path: Path) -> None:
    tensors = sample_tensors()
    write_sharded(tmp_path, tensors)
    save_file({"decoy": torch.zeros(1)}, str(tmp_path / "consolidated.safetensors"))  # not in the index
    files = safetensors_files(tmp_path)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert_same(dict(iter_safetensors(files, device=torch.device("cpu"))), tensors)


def test_hf_cache_symlinked_shards_are_accepted(tmp_path: Path) -> None:
    """HF's cache keeps blobs in ../../blobs and symlinks them into the snapshot folder."""
    tensors = sample_tensors()
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    weight_map = write_sharded(blobs, tensors)
    for shard in set(weight_map.values()):
        (snapshot / shard).symlink_to(Path("../..") / "blobs" / shard)
    write_index(snapshot, weight_map)
    assert_same(dict(iter_safetensors(safetensors_files(snapshot))), tensors)


def test_tensors_are_yielded_lazily_in_data_order(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    stream = iter_safetensors([path])
    name, first = next(stream)
    assert name == next(iter(read_header(path)))
    assert torch.equal(first, tensors[name])
    stream.close()  # closing early must release the file cleanly


def test_read_header_describes_tensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(sample_tensors(), str(path))
    header = read_header(path)
    entry = header["model.embed_tokens.weight"]
    assert (entry.dtype, entry.shape, entry.end - entry.begin) == ("F32", (16, 8), 16 * 8 * 4)
    assert header["scalar"].shape == () and header["empty"].begin == header["empty"].end
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(header)


# ------------------------------------------------------------------ broken files


def good_file(tmp_path: Path) -> tuple[dict[str, Any], bytes]:
    """Header and data section of a small valid file, for tampering."""
    path = tmp_path / "source.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float16)}, str(path))
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def tampered(header: dict[str, Any], **changes: Any) -> dict[str, Any]:
    result = json.loads(json.dumps(header))
    for name, spec in changes.items():
        result[name] = spec
    return result


def broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    header, data = good_file(tmp_path)
    whole = write_raw(tmp_path / "whole.safetensors", header, data).read_bytes()
    cases: dict[str, tuple[bytes | dict[str, Any], bytes, int | None, str]] = {
        "truncated": (header, data[:-3], None, "truncated"),
        "trailing-bytes": (header, data + b"\0\0", None, "unexpected bytes"),
        "header-too-long": (header, data, 10**6, "larger than the rest of the file"),
        "header-length-absurd": (header, data, 2**63, "larger than the rest of the file"),
        "bad-json": (b'{"a": {"dtype": ', data, None, "not valid JSON"),
        "not-utf8": (b'{"\xff": 1}', data, None, "not valid JSON"),
        "not-an-object": (b"[1, 2, 3]   ", data, None, "does not start with"),
        "leading-space": (b" {}", data, None, "does not start with"),
        "deeply-nested": (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", data, None, "not valid JSON"),
        "duplicate-name": (b'{"a": 1, "a": 2}', data, None, "duplicate key"),
        "offsets-outside-data": (
            tampered(header, b={"dtype": "F16", "shape": [4], "data_offsets": [24, 10**9]}),
            data,
            None,
            "needs 8 bytes",
        ),
        "offsets-past-end": (
            tampered(header, b={"dtype": "F16", "shape": [40], "data_offsets": [24, 104]}),
            data,
            None,
            "truncated",
        ),
        "negative-offset": (
            tampered(header, a={"dtype": "F32", "shape": [2, 3], "data_offsets": [-4, 20]}),
            data,
            None,
            "invalid data_offsets",
        ),
        "shape-mismatch": (
            tampered(header, a={"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 24]}),
            data,
            None,
            "needs 36 bytes",
        ),
        "gap": (
            tampered(header, b={"dtype": "F16", "shape": [2], "data_offsets": [28, 32]}),
            data,
            None,
            "gap",
        ),
        "overlap": (
            tampered(header, b={"dtype": "F16", "shape": [4], "data_offsets": [20, 28]}),
            data,
            None,
            "overlaps",
        ),
        "unknown-dtype": (
            tampered(header, b={"dtype": "Q4", "shape": [4], "data_offsets": [24, 32]}),
            data,
            None,
            "dtype",
        ),
        "bad-shape": (
            tampered(header, b={"dtype": "F16", "shape": [-4], "data_offsets": [24, 32]}),
            data,
            None,
            "shape",
        ),
        "bad-metadata": (tampered(header, __metadata__={"format": 1}), data, None, "__metadata__"),
        "entry-not-object": (tampered(header, b=[1, 2]), data, None, "not an object"),
    }
    files = {}
    for case, (head, body, length, message) in cases.items():
        files[case] = (write_raw(tmp_path / f"{case}.safetensors", head, body, length=length), message)
    for case, content, message in [
        ("empty", b"", "too short"),
        ("seven-bytes", whole[:7], "too short"),
        ("header-only", whole[:20], "larger than the rest"),
        ("zip-pickle-renamed", b"PK\x03\x04" + bytes(60), "pickle"),
        ("raw-pickle-renamed", b"\x80\x02}q\x00." + bytes(60), "pickle"),
    ]:
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(content)
        files[case] = (path, message)
    return files


def test_broken_files_raise_weights_error_naming_the_file(tmp_path: Path) -> None:
    for case, (path, message) in broken_files(tmp_path).items():
        with pytest.raises(WeightsError) as exc:
            list(iter_safetensors([path]))
        assert path.name in str(exc.value), case
        assert message in str(exc.value), (case, str(exc.value))


def test_header_length_that_looks_like_a_pickle_opcode(tmp_path: Path) -> None:
    """0x280 = 640 starts with the bytes of a protocol-2 pickle; a valid length must still win."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode().ljust(0x280)
    path = write_raw(tmp_path / "model.safetensors", header, struct.pack("<2f", 1.0, 2.0))
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert_same(dict(iter_safetensors(safetensors_files(tmp_path))), {"x": torch.tensor([1.0, 2.0])})


@pytest.mark.parametrize("zipped", [True, False])
def test_real_torch_save_renamed_to_safetensors(tmp_path: Path, zipped: bool) -> None:
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(WeightsError, match="pickle"):
        safetensors_files(tmp_path)


def test_validation_fails_before_any_tensor_is_yielded(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"x": torch.ones(2)}, str(good))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-1])
    stream = iter_safetensors([good, bad])
    with pytest.raises(WeightsError, match=r"bad\.safetensors"):
        next(stream)


def test_duplicate_tensor_across_files(tmp_path: Path) -> None:
    for name in ("one", "two"):
        save_file({"x": torch.ones(2)}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(WeightsError, match=r"two\.safetensors.*'x' also appears in .*one\.safetensors"):
        list(iter_safetensors([tmp_path / "one.safetensors", tmp_path / "two.safetensors"]))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"gone\.safetensors"):
        list(iter_safetensors([tmp_path / "gone.safetensors"]))


# ------------------------------------------------------------------ folders and pickles


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".BIN"])
def test_refuse_pickle(suffix: str) -> None:
    path = Path(f"/models/x/pytorch_model{suffix}")
    with pytest.raises(WeightsError, match="pickle") as exc:
        refuse_pickle(path)
    assert str(path) in str(exc.value) and "safetensors" in str(exc.value)


def test_refuse_pickle_lets_other_files_through() -> None:
    refuse_pickle(Path("model.safetensors"))
    refuse_pickle(Path("model.gguf"))


def test_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickle") as exc:
        safetensors_files(tmp_path)
    assert "pytorch_model.bin" in str(exc.value)


def test_pickle_next_to_safetensors_is_ignored(tmp_path: Path) -> None:
    save_file({"x": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    torch.save({}, tmp_path / "training_args.bin")
    assert safetensors_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_empty_folder_and_non_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no weights found") as exc:
        safetensors_files(tmp_path)
    assert str(tmp_path) in str(exc.value)
    with pytest.raises(WeightsError, match="not a directory"):
        safetensors_files(tmp_path / "absent")


def test_unindexed_safetensors_are_not_guessed(tmp_path: Path) -> None:
    save_file({"x": torch.ones(1)}, str(tmp_path / "consolidated.safetensors"))
    with pytest.raises(WeightsError, match=r"consolidated\.safetensors"):
        safetensors_files(tmp_path)


def test_corrupt_single_file_is_caught_by_discovery(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x10" + bytes(7) + b"{}")
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        safetensors_files(tmp_path)


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ("model-00003-of-00002.safetensors", "does not exist"),
        ("../x.safetensors", "not a plain file name"),
        ("/etc/passwd", "not a plain file name"),
        ("sub\\x.safetensors", "not a plain file name"),
        ("..", "not a plain file name"),
        ("", "not a plain file name"),
        ("pytorch_model-00001-of-00002.bin", "pickle"),
        ("weights.npz", "not a .safetensors file"),
    ],
)
def test_bad_index_entries(tmp_path: Path, shard: str, message: str) -> None:
    weight_map = write_sharded(tmp_path, sample_tensors())
    weight_map["extra.weight"] = shard
    write_index(tmp_path, weight_map)
    with pytest.raises(WeightsError, match=message) as exc:
        safetensors_files(tmp_path)
    assert "model.safetensors.index.json" in str(exc.value) or "pytorch_model" in str(exc.value)


def test_index_assigning_a_tensor_the_shard_lacks(tmp_path: Path) -> None:
    weight_map = write_sharded(tmp_path, sample_tensors())
    weight_map["model.norm.weight"] = "model-00001-of-00002.safetensors"
    write_index(tmp_path, weight_map)
    with pytest.raises(WeightsError, match=r"model-00001-of-00002\.safetensors.*model\.norm\.weight"):
        safetensors_files(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"weight_map": {}}', b'{"weight_map": {"a": 3}}', b'{"metadata": {}}'],
)
def test_malformed_index(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(WeightsError) as exc:
        safetensors_files(tmp_path)
    assert "model.safetensors.index.json" in str(exc.value)

"""Block-quantised weights: packing, the VNNI kernel against the same arithmetic in torch, and GGUF's own blocks."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from levante.layers.block_quant import (
    BlockQuant,
    BlockQuantWeight,
    pack,
    quantize_activations,
    quantize_blocks,
    reference_mm,
    unpack,
)
from levante.layers.cpu_kernels import CpuKernels, load_cpu_kernels
from levante.loaders.gguf import GGUFFile

T = GGMLQuantizationType


@pytest.fixture(scope="module")
def kernels() -> CpuKernels:
    k = load_cpu_kernels()
    if k is None or not k.vnni:
        pytest.skip("no AVX512-VNNI kernel on this machine: block-quantised weights are not used here")
    return k


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("n", "k"), [(16, 32), (50, 64), (960, 576)])
def test_pack_round_trips(bits: int, n: int, k: int) -> None:
    bq = quantize_blocks(random_weight(n, k), bits)
    assert int(bq.q.max()) <= (1 << bits) - 1
    packed, scales = pack(bq)
    assert packed.shape == (-(-n // 16), k // 32, 64 * (4 if bits == 4 else 8))
    back = unpack(packed, scales, bits, n)
    assert torch.equal(back.q, bq.q)
    assert torch.equal(back.d, bq.d) and torch.equal(back.m, bq.m)  # quantize_blocks keeps fp16-exact scales


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_blocks_is_within_half_a_step(bits: int) -> None:
    w = random_weight(64, 256)
    bq = quantize_blocks(w, bits)
    step = bq.d.repeat_interleave(32, dim=1)
    # half a step from rounding q, plus the rounding of d and m to fp16
    assert ((bq.dequantize() - w).abs() <= step * 0.5 + 1e-4).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 33])
@pytest.mark.parametrize(("n", "k"), [(16, 32), (50, 64), (200, 576)])
def test_kernel_computes_the_reference_arithmetic(kernels: CpuKernels, bits: int, rows: int, n: int, k: int) -> None:
    """float32 in and out: the integer dot products are exact, so only float32 summation order differs."""
    bq = quantize_blocks(random_weight(n, k, seed=rows), bits)
    weight = BlockQuantWeight(bq, kernels)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k + rows))
    got, expected = weight.mm(x), reference_mm(x.double(), bq).float()
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_in_half_precision(kernels: CpuKernels, dtype: torch.dtype) -> None:
    bq = quantize_blocks(random_weight(96, 128), 4)
    x = torch.randn(6, 128).to(dtype)
    got = BlockQuantWeight(bq, kernels).mm(x)
    assert got.dtype == dtype
    expected = reference_mm(x.double(), bq)
    assert (got.double() - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()  # output rounding


def test_residual_is_added_in_the_kernel(kernels: CpuKernels) -> None:
    bq = quantize_blocks(random_weight(40, 96), 8)
    weight = BlockQuantWeight(bq, kernels)
    x, residual = torch.randn(5, 96), torch.randn(5, 40)
    assert torch.allclose(weight.mm(x, residual), weight.mm(x) + residual, atol=1e-6)


def test_a_row_does_not_depend_on_its_batch(kernels: CpuKernels) -> None:
    """Rows are quantised and summed on their own: bit-identical alone or among others, whatever the tiling."""
    weight = BlockQuantWeight(quantize_blocks(random_weight(130, 192), 4), kernels)
    x = torch.randn(37, 192)
    full = weight.mm(x)
    for rows in (slice(0, 1), slice(3, 5), slice(10, 17), slice(1, 37)):
        assert torch.equal(weight.mm(x[rows]), full[rows])


def test_quantisation_error_is_small_against_the_float_product(kernels: CpuKernels) -> None:
    """int8 activations per block of 32 cost well under 1% of the output scale (4-bit weights held fixed)."""
    bq = quantize_blocks(random_weight(256, 576), 4)
    x = torch.randn(8, 576)
    exact = x @ bq.dequantize().t()
    got = BlockQuantWeight(bq, kernels).mm(x)
    assert (got - exact).abs().max().item() <= 0.01 * exact.abs().max().item()


def test_activation_quantisation_reference() -> None:
    x = torch.tensor([[0.5] * 31 + [-2.0]] * 2)
    qx, dx, sx = quantize_activations(x)
    assert qx[0, -1].item() == -127 and torch.allclose(dx, torch.full((2, 1), 2.0 / 127))
    assert torch.allclose(sx, dx * qx.sum(dim=-1, keepdim=True).view(2, 1))
    assert torch.equal(quantize_activations(torch.zeros(1, 32))[0], torch.zeros(1, 32))


def test_bad_shapes_are_refused(kernels: CpuKernels) -> None:
    weight = BlockQuantWeight(quantize_blocks(random_weight(32, 64), 4), kernels)
    with pytest.raises(RuntimeError, match="inputs"):
        weight.mm(torch.randn(2, 96))
    with pytest.raises(RuntimeError, match="residual"):
        weight.mm(torch.randn(2, 64), torch.randn(3, 32))


def test_empty_batch(kernels: CpuKernels) -> None:
    weight = BlockQuantWeight(quantize_blocks(random_weight(32, 64), 8), kernels)
    assert weight.mm(torch.empty(0, 64)).shape == (0, 32)


# ---- GGUF's blocks, as stored

SPLITTABLE = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K]
FP16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q4_K: (0, 2), T.Q5_K: (0, 2)}


def random_blocks(rng: np.random.Generator, qtype: int, shape: tuple[int, int]) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[T(qtype)]
    data = rng.integers(0, 256, size=(shape[0], shape[1] // block_size * type_size), dtype=np.uint8)
    blocks = data.reshape(-1, type_size)
    for start in FP16_FIELDS[qtype]:
        blocks[:, start : start + 2] = (rng.standard_normal((blocks.shape[0], 1)) * 0.01).astype(np.float16).view(np.uint8)
    return data


@pytest.mark.parametrize("qtype", SPLITTABLE, ids=lambda t: T(t).name)
def test_gguf_blocks_are_the_stored_weights(tmp_path: Path, qtype: int) -> None:
    """d * q + m of the split blocks is, bit for bit, what gguf's reference dequantiser gives."""
    rng = np.random.default_rng(int(qtype))
    shape = (8, 512)
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("w", random_blocks(rng, qtype, shape), raw_dtype=T(qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    stored = gguf.GGUFReader(path).tensors[0]
    reference = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type).copy()).float()
    assert reference.shape == shape
    with GGUFFile(path) as f:
        bq = f.load_blocks("w")
    assert bq is not None and bq.q.shape == shape and bq.d.shape == (8, 16)
    assert bq.bits == (4 if T(qtype).name.startswith("Q4") else 8)
    assert int(bq.q.max()) < (16 if bq.bits == 4 else 256)
    g = bq.q.view(8, 16, 32).float()
    assert torch.equal((g * bq.d[..., None] + bq.m[..., None]).view(shape), reference)
    if qtype not in (T.Q4_K, T.Q5_K):  # legacy types: scales are fp16 already, so packing keeps them exactly
        assert torch.equal(bq.d.half().float(), bq.d) and torch.equal(bq.m.half().float(), bq.m)


def test_types_without_32_blocks_give_none(tmp_path: Path) -> None:
    path = tmp_path / "f.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("f", np.ones((4, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile(path) as f:
        assert f.load_blocks("f") is None


def test_cat_keeps_the_widest_storage() -> None:
    a = quantize_blocks(random_weight(16, 64), 4)
    b = quantize_blocks(random_weight(16, 64, seed=1), 8)
    both = BlockQuant.cat([a, b])
    assert both.bits == 8 and torch.equal(both.dequantize()[:16], a.dequantize())

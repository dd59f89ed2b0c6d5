"""Quantised weight formats (int8, int4, auto) against the native projection: torch's weight-only kernels
(`Linear.quantize`, the path of CPUs without VNNI) and the block-quantised kernel (`quantize_linears`)."""

from __future__ import annotations

import pytest
import torch

from levante.layers.block_quant import BlockQuantWeight
from levante.layers.cpu_kernels import load_cpu_kernels
from levante.layers.linear import (
    INT4_GROUP,
    Int4Weight,
    Int8Weight,
    Linear,
    four_bit_checkpoint,
    quantize_linears,
    quantized_checkpoint,
)


def make(dtype: torch.dtype, inp: int = 192, out: int = 320) -> Linear:
    torch.manual_seed(0)
    lin = Linear(inp, out)
    lin.weight.data = torch.randn(out, inp).to(dtype) * 0.05
    return lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("fmt", ["int8", "int4", "auto"])
def test_formats_track_the_native_projection(dtype: torch.dtype, rows: int, fmt: str) -> None:
    lin = make(dtype)
    x = torch.randn(rows, 192).to(dtype)
    expected = lin(x).float()
    lin.quantize(fmt, max_rows=16)  # auto: an int8 copy, as for a checkpoint that is not 4-bit
    got = lin(x).float()
    # Per-row int8 keeps ~7 bits (error well under 2% of the output scale); 4 bits in groups of 32, ~10%.
    tolerance = 0.10 if fmt == "int4" else 0.02
    assert (got - expected).abs().max().item() <= tolerance * expected.abs().max().item()
    if fmt == "auto":  # both paths compute with the same (quantised) weights, whatever the number of rows
        few, many = lin(x[:1]).float(), lin(torch.cat([x[:1]] * 20)).float()
        assert (few - many[:1]).abs().max().item() <= 0.02 * many.abs().max().item()
        assert lin.weight.numel() == 192 * 320
    if fmt != "auto":
        assert lin.weight.numel() == 0  # the native weights are gone
        assert isinstance(lin.quantized, Int4Weight if fmt == "int4" else Int8Weight)


def test_int4_reproduces_weights_that_were_4_bit_blocks() -> None:
    """Weights dequantised from GGUF-style 4-bit blocks (w = d * q + m per 32 inputs) come back as they
    were, up to the rounding of d and m to bfloat16: what "auto" relies on for Q4 checkpoints."""
    torch.manual_seed(1)
    out, inp = 64, 256
    q = torch.randint(0, 16, (out, inp // INT4_GROUP, INT4_GROUP)).float()
    q[..., 0], q[..., 1] = 0, 15  # every block spans its full range, as a quantiser's output does
    d = (torch.rand(out, inp // INT4_GROUP, 1) * 0.01 + 0.001).bfloat16().float()
    m = (-torch.rand(out, inp // INT4_GROUP, 1) * 0.05).bfloat16().float()
    w = (d * q + m).view(out, inp)
    lin = Linear(inp, out)
    lin.weight.data = w.clone()  # float32: the kernel's tables in float32 keep d and m exactly
    x = torch.randn(3, inp)
    expected = x @ w.t()
    lin.quantize("auto", max_rows=16, bits=4)
    assert isinstance(lin.quantized, Int4Weight)
    assert torch.allclose(lin.weight, w, atol=1e-6)  # the weights it stands for: the original ones
    assert torch.allclose(lin(x), expected, rtol=1e-4, atol=1e-4)  # int4 kernel (3 rows)
    assert torch.allclose(lin(torch.cat([x] * 8))[:3], expected, rtol=1e-4, atol=1e-4)  # native GEMM (24 rows)


def test_int4_falls_back_to_int8_when_inputs_do_not_make_groups() -> None:
    lin = make(torch.float32, inp=40)  # 40 is not a multiple of 32
    lin.quantize("int4", max_rows=16)
    assert isinstance(lin.quantized, Int8Weight)


def test_auto_quantises_only_four_bit_checkpoints() -> None:
    assert four_bit_checkpoint("Q4_1") and four_bit_checkpoint("Q4_K") and four_bit_checkpoint("q4_0")
    assert not four_bit_checkpoint("Q8_0") and not four_bit_checkpoint("Q6_K") and not four_bit_checkpoint("bfloat16")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="weight format"):
        make(torch.float32).quantize("int3", 16)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_linears_reaches_every_projection(tiny_model, fmt: str) -> None:  # type: ignore[no-untyped-def]
    from levante import LLM, SamplingParams

    path = tiny_model("llama")
    ref = LLM(str(path), dtype="float32", num_kv_blocks=32, block_size=8)
    q = LLM(str(path), dtype="float32", num_kv_blocks=32, block_size=8, weight_format=fmt)
    model = q.engine.loaded.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.quantized is not None for m in linears)
    ids = {"prompt_token_ids": list(range(5, 45))}
    a, b = ref.score(ids), q.score(ids)
    # A random tiny model's logits are nearly flat, so 4 bits move its argmax often: compare the logits themselves.
    cosine = torch.nn.functional.cosine_similarity(a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True), dim=-1)
    print(f"{fmt}: argmax agreement {(a.argmax(-1) == b.argmax(-1)).float().mean().item():.2f}, min logit cosine {cosine.min().item():.4f}")
    assert cosine.min().item() >= (0.9 if fmt == "int4" else 0.995)
    if fmt != "int4":
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
    out = q.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 8
    quantize_linears(ref.engine.loaded.model, "native")  # a no-op
    assert all(m.quantized is None for m in ref.engine.loaded.model.modules() if isinstance(m, Linear))


def test_auto_keeps_other_checkpoints_native(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from levante import LLM

    llm = LLM(str(tiny_model("llama")), dtype="float32", num_kv_blocks=32, block_size=8)  # weight_format "auto"
    assert llm.engine.config.weight_format == "auto"
    assert all(m.quantized is None for m in llm.engine.loaded.model.modules() if isinstance(m, Linear))


def test_auto_on_a_four_bit_checkpoint(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """On a CPU with the VNNI kernel, a Q4 checkpoint's projections become 4-bit blocks and its LM head 8-bit
    ones, run at every batch size; the native weights are dropped."""
    from levante import LLM

    kernels = load_cpu_kernels()
    if kernels is None or not kernels.vnni:
        pytest.skip("no AVX512-VNNI kernel here (the fallback is tested below)")
    llm = LLM(str(tiny_model("llama")), dtype="float32", num_kv_blocks=32, block_size=8, weight_format="native")
    model = llm.engine.loaded.model
    x = torch.randn(3, model.config.hidden_size)
    lin = model.layers[0].self_attn.qkv_proj
    exact = lin(x)
    quantize_linears(model, "auto", 8, checkpoint_quantization="Q4_1")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(isinstance(m.quantized, BlockQuantWeight) for m in linears)
    assert all(m.quantized.bits == (8 if m is model.lm_head else 4) for m in linears)  # type: ignore[union-attr]
    assert all(m.weight.numel() == 0 for m in linears)
    got = lin(x)  # 4 bits and int8 activations: close to the float projection, not equal
    assert (got - exact).abs().max().item() <= 0.15 * exact.abs().max().item()
    assert torch.equal(lin(x[:1]), got[:1])  # the same arithmetic whatever the number of rows


def test_auto_on_a_four_bit_checkpoint_without_vnni(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Where the integer kernel cannot run, a Q4 checkpoint gets torch's int4 copies for few rows and native weights
    equal to them for many."""
    from levante import LLM
    from levante.layers import linear

    llm = LLM(str(tiny_model("llama")), dtype="float32", num_kv_blocks=32, block_size=8, weight_format="native")
    model = llm.engine.loaded.model
    monkeypatch.setattr(linear, "load_cpu_kernels", lambda: None)
    quantize_linears(model, "auto", 8, checkpoint_quantization="Q4_1")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(isinstance(m.quantized, Int8Weight if m is model.lm_head else Int4Weight) for m in linears)
    x = torch.randn(3, linears[0].in_features)
    lin = linears[0]
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight), rtol=1e-4, atol=1e-4)


def test_formats_keep_an_moe_router_native(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from levante import LLM

    llm = LLM(str(tiny_model("mixtral")), dtype="float32", num_kv_blocks=32, block_size=8, weight_format="int8")
    routers = [m.gate for m in llm.engine.loaded.model.modules() if hasattr(m, "w13")]
    assert routers and all(r.quantized is None and r.weight.numel() > 0 for r in routers)


def test_residual_is_added_on_every_path() -> None:
    lin = make(torch.float32)
    x, residual = torch.randn(4, 192), torch.randn(4, 320)
    expected = lin(x) + residual
    assert torch.allclose(lin(x, residual), expected, atol=1e-5)  # native: addmm
    lin.quantize("int8", max_rows=16)
    assert torch.allclose(lin(x, residual), lin(x) + residual, atol=1e-6)  # torch's int8 kernel


def test_quantized_checkpoint_names() -> None:
    assert quantized_checkpoint("Q4_1") and quantized_checkpoint("Q8_0") and quantized_checkpoint("Q6_K")
    assert quantized_checkpoint("IQ4_XS") and not quantized_checkpoint("F16") and not quantized_checkpoint("bfloat16")

"""int8 weight formats against the native projection."""

from __future__ import annotations

import pytest
import torch

from levante.layers.linear import Linear, quantize_linears


def make(dtype: torch.dtype) -> Linear:
    torch.manual_seed(0)
    lin = Linear(192, 320)
    lin.weight.data = torch.randn(320, 192).to(dtype) * 0.05
    return lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("fmt", ["int8", "auto"])
def test_int8_formats_track_the_native_projection(dtype: torch.dtype, rows: int, fmt: str) -> None:
    lin = make(dtype)
    x = torch.randn(rows, 192).to(dtype)
    expected = lin(x).float()
    lin.quantize(fmt, max_rows=16)
    got = lin(x).float()
    # Per-row symmetric int8 keeps ~7 bits: error well under 2% of the output scale.
    assert (got - expected).abs().max().item() <= 0.02 * expected.abs().max().item()
    if fmt == "auto" and rows > 16:
        assert torch.equal(got, expected)  # many rows: the native weights are used
    if fmt == "int8":
        assert lin.weight.numel() == 0 and lin.qweight is not None and lin.qweight.dtype == torch.int8


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="weight format"):
        make(torch.float32).quantize("int4", 16)


def test_quantize_linears_reaches_every_projection(tiny_model, ) -> None:  # type: ignore[no-untyped-def]
    from levante import LLM, SamplingParams

    path = tiny_model("llama")
    ref = LLM(str(path), dtype="float32", num_kv_blocks=32, block_size=8)
    q8 = LLM(str(path), dtype="float32", num_kv_blocks=32, block_size=8, weight_format="int8")
    linears = [m for m in q8.engine.loaded.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.qweight is not None for m in linears)
    ids = {"prompt_token_ids": list(range(5, 45))}
    a, b = ref.score(ids), q8.score(ids)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
    out = q8.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 8
    quantize_linears(ref.engine.loaded.model, "native")  # a no-op
    assert all(m.qweight is None for m in ref.engine.loaded.model.modules() if isinstance(m, Linear))

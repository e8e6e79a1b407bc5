"""GPTQ on the FP4 grid (nvfp4a16, mxfp4a16): block scales fixed first, then the column loop.

On random weights with correlated inputs (where the Hessian matters), GPTQ's output error
is below round-to-nearest's on the same block scales.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from torchquant import ConfigError, GPTQConfig, QuantConfig, QuantScheme, WeightQuant, convert_model
from torchquant.algorithms.gptq import accumulate_hessian, gptq_quantize_fp4
from torchquant.modules import QuantLinear
from torchquant.numerics.fp4 import FP4_ROUNDING, FP4_SCALE_SEARCH, dequantize_fp4_weight

N, K, TOKENS = 48, 160, 2048  # K = 10 NVFP4 blocks, 5 MXFP4 blocks


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    x = torch.randn(TOKENS, K, generator=g) @ mixing  # correlated input columns
    w = torch.randn(N, K, generator=g)
    hessian, _ = accumulate_hessian(None, 0, x)
    return w, x, hessian


def _output_error(x, w, q) -> float:
    wq = dequantize_fp4_weight(q.codes, q.scales, q.global_scale, q.block)
    return float((x @ (wq - w).t()).norm() / (x @ w.t()).norm())


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_same_block_scales(kind, act_order):
    w, x, hessian = _problem()
    rtn = FP4_ROUNDING[kind](w)
    q = gptq_quantize_fp4(w, hessian, kind, block_size=64, act_order=act_order)
    assert torch.equal(q.scales.view(torch.uint8), rtn.scales.view(torch.uint8))
    assert (q.global_scale is None) == (kind == "mxfp4")
    if q.global_scale is not None:
        assert torch.equal(q.global_scale, rtn.global_scale)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    gptq_error, rtn_error = _output_error(x, w, q), _output_error(x, w, rtn)
    assert gptq_error < 0.9 * rtn_error


def test_searched_scales_are_the_mse_search():
    w, x, hessian = _problem(1)
    q = gptq_quantize_fp4(w, hessian, "mxfp4", search_scales=True)
    assert torch.equal(q.scales, FP4_SCALE_SEARCH["mxfp4"](w).scales)
    assert _output_error(x, w, q) < _output_error(x, w, FP4_SCALE_SEARCH["mxfp4"](w))


def test_a_dead_input_column_is_zeroed():
    w, x, _ = _problem(2)
    x[:, 3] = 0.0
    hessian, _ = accumulate_hessian(None, 0, x)
    q = gptq_quantize_fp4(w, hessian, "nvfp4")
    assert torch.equal(q.codes[:, 3] & 7, torch.zeros(N, dtype=torch.uint8))


def test_act_order_needs_static_groups_for_fp4():
    with pytest.raises(ConfigError, match="gptq.static_groups.*fixed block scales"):
        QuantScheme(
            WeightQuant("nvfp4"),
            algorithm="gptq",
            gptq=GPTQConfig(act_order=True, static_groups=False),
        )


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_convert_model_runs_gptq_on_fp4_weights(kind):
    model = tiny_llama(hidden=64, inter=96, heads=2, kv_heads=1, layers=1, seed=3)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(4))
    scheme = QuantScheme(WeightQuant(kind), algorithm="gptq")
    convert_model(model, QuantConfig(default=scheme), calibration_data=ids, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.scheme.algorithm == "gptq" for m in layers)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

"""GPTQ onto block-wise FP8 (``fp8-block``, ``w8a16-fp8-block`` with ``algorithm="gptq"``):
the 128x128 block scales fixed first, then the column loop on the E4M3 grid.

On random weights with correlated inputs (where the Hessian matters), GPTQ's output error
is below round-to-nearest's on the same block scales; with a diagonal Hessian there is
no error to spread, so it is round-to-nearest exactly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import tiny_llama

from torchquant import ConfigError, GPTQConfig, QuantConfig, convert_model, scheme_from_name
from torchquant.algorithms.gptq import accumulate_hessian, gptq_quantize_fp8_block
from torchquant.errors import QuantizationError
from torchquant.modules import QuantLinear
from torchquant.numerics import (
    dequantize_fp8_block_weight,
    quantize_fp8_block_weight,
    search_fp8_block_weight,
)

N, K, TOKENS = 160, 200, 2048  # partial blocks along both N and K
BLOCK = (128, 128)


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    x = torch.randn(TOKENS, K, generator=g) @ mixing  # correlated input columns
    w = torch.randn(N, K, generator=g) * 0.05
    hessian, _ = accumulate_hessian(None, 0, x)
    return w, x, hessian


def _output_error(x, w, q, scales) -> float:
    wq = dequantize_fp8_block_weight(q, scales, BLOCK)
    return float((x @ (wq - w).t()).norm() / (x @ w.t()).norm())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_same_block_scales(act_order):
    w, x, hessian = _problem()
    rtn_q, rtn_s = quantize_fp8_block_weight(w, BLOCK)
    q, scales = gptq_quantize_fp8_block(w, hessian, BLOCK, block_size=64, act_order=act_order)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (N, K)
    assert torch.equal(scales, rtn_s)
    assert _output_error(x, w, q, scales) < 0.8 * _output_error(x, w, rtn_q, rtn_s)


def test_searched_scales_are_the_block_search():
    w, x, hessian = _problem(1)
    search_q, search_s = search_fp8_block_weight(w, BLOCK)
    q, scales = gptq_quantize_fp8_block(w, hessian, BLOCK, search_scales=True)
    assert torch.equal(scales, search_s)
    assert _output_error(x, w, q, scales) < _output_error(x, w, search_q, search_s)


def test_a_diagonal_hessian_gives_round_to_nearest_exactly():
    w, _, _ = _problem(2)
    hessian = torch.diag(torch.rand(K, generator=torch.Generator().manual_seed(5)) + 0.5)
    q, scales = gptq_quantize_fp8_block(w, hessian, BLOCK, act_order=True)
    rtn_q, rtn_s = quantize_fp8_block_weight(w, BLOCK)
    assert torch.equal(scales, rtn_s)
    assert torch.equal(q.view(torch.uint8), rtn_q.view(torch.uint8))


def test_a_dead_input_column_is_zeroed():
    w, x, _ = _problem(3)
    x[:, 7] = 0.0
    hessian, _ = accumulate_hessian(None, 0, x)
    q, _ = gptq_quantize_fp8_block(w, hessian, BLOCK)
    assert torch.equal(q[:, 7].float(), torch.zeros(N))


def test_nonfinite_weights_are_refused_by_name():
    w, _, hessian = _problem(4)
    w[3, 5] = float("nan")
    with pytest.raises(QuantizationError, match="layers.1.mlp.down_proj"):
        gptq_quantize_fp8_block(w, hessian, BLOCK, name="layers.1.mlp.down_proj")


def test_act_order_needs_static_groups_for_block_fp8():
    with pytest.raises(ConfigError, match="gptq.static_groups.*block-wise fp8"):
        dataclasses.replace(
            scheme_from_name("fp8-block"),
            algorithm="gptq",
            gptq=GPTQConfig(act_order=True, static_groups=False),
        )


@pytest.mark.parametrize("name", ["fp8-block", "w8a16-fp8-block"])
def test_convert_model_runs_gptq_on_block_fp8(name):
    model = tiny_llama(hidden=160, inter=200, heads=2, kv_heads=1, layers=1, seed=3)
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    scheme = dataclasses.replace(scheme_from_name(name), algorithm="gptq")
    convert_model(model, QuantConfig(default=scheme), calibration_data=ids, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.scheme.algorithm == "gptq" for m in layers)
    assert all(m.qweight.dtype == torch.float8_e4m3fn for m in layers)
    with torch.no_grad():
        out = model(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 0.1

"""MXFP4 and MXFP8 activations with either E8M0 scale rounding: the numerics (the
reference), the CPU op and the Triton one-pass quantizer (values and scales byte for byte),
and the GEMM fed by it against the op's reference, on ragged K (a short last block, an odd K).
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import KERNEL_DEVICE, assert_matches, cfg, requires_kernels
from torchquant.triton_kernels.microscaled_gemm import microscaled_gemm
from torchquant.triton_kernels.microscaled_quant import quantize_microscaled as quantize_kernel
from torchquant.triton_kernels.microscaled_quant import quantize_to_scaled_values

from torchquant import ActivationQuant, QuantLinear, QuantScheme, WeightQuant
from torchquant.numerics.fp4 import pack_e2m1
from torchquant.numerics.microscaling import dequantize_microscaled, quantize_microscaled
from torchquant.ops.microscaled import (
    linear_microscaled,
    linear_microscaled_cpu,
    linear_microscaled_reference,
)

pytestmark = requires_kernels

ROUNDINGS = ("ocp", "compressed-tensors")
FORMATS = ("mxfp4", "mxfp8")


def _scheme(rounding: str, fmt: str = "mxfp4") -> QuantScheme:
    return QuantScheme(
        WeightQuant(fmt, scale_rounding=rounding),
        ActivationQuant(fmt, scale_rounding=rounding),
    )


def _activation(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows whose block maxima sit on both sides of 1.75 times a power of two."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    x[0, : min(k, 32)] = 0.0  # -- an all-zero block
    if m > 2:
        x[1, 0] = 1.75 * 2.0**3  # -- exactly at the edge: rounds up
        x[2, min(k - 1, 33)] = -1.7498 * 2.0**-3  # -- just under it: stays
        x[2, 1] = 1e-30  # -- a tiny block max (float32)
    return x.to(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k"), [(1, 32), (3, 97), (5, 300)])
def test_triton_quantizer_writes_the_reference_bytes(fmt, rounding, dtype, m, k):
    x = _activation(m, k, dtype, seed=k)
    q = quantize_microscaled(x, fmt, scale_rounding=rounding)
    values, scales = quantize_kernel(x.to(KERNEL_DEVICE), fmt, None, rounding)
    assert torch.equal(scales.cpu(), q.scales)
    want = q.values if fmt == "mxfp8" else pack_e2m1(q.values)
    assert torch.equal(values.view(torch.uint8).cpu(), want.view(torch.uint8))
    scaled = quantize_to_scaled_values(x.to(KERNEL_DEVICE), fmt, None, rounding)
    assert torch.equal(scaled.float().cpu(), dequantize_microscaled(q))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_roundings_differ_where_a_block_max_reaches_one_and_three_quarters(fmt):
    x = _activation(3, 97, torch.float32, seed=0)
    spec = quantize_kernel(x.to(KERNEL_DEVICE), fmt, None, "ocp")[1].cpu()
    ours = quantize_kernel(x.to(KERNEL_DEVICE), fmt, None, "compressed-tensors")[1].cpu()
    step = ours.to(torch.int16) - spec.to(torch.int16)
    assert set(step.flatten().tolist()) == {0, 1}
    assert step[1, 0] == 1 and step[2, 1] == 0 and step[0, 0] == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_op_matches_the_reference(fmt, rounding, dtype):
    g = torch.Generator().manual_seed(1)
    n, k = 24, 72  # -- 72 = 2.25 x 32: a short last block
    layer = QuantLinear.from_weight(
        torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype),
        _scheme(rounding, fmt),
    )  # fmt: skip
    x = _activation(5, k, dtype, seed=2)
    args = (layer.qweight, layer.scales, None, layer.bias, None, fmt, rounding)
    want = linear_microscaled_reference(x, *args)
    assert torch.equal(layer.reference_forward(x), want)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0)
    torch.testing.assert_close(linear_microscaled_cpu(x, *args), want, **tolerance)
    torch.testing.assert_close(layer(x), want, **tolerance)
    assert torch.equal(linear_microscaled(x, *args), layer(x))
    if rounding != "ocp":  # -- the rounding reaches the op: the spec's gives other outputs
        spec = linear_microscaled_reference(x, *args[:-1], "ocp")
        assert not torch.equal(spec, want)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize(("m", "n", "k", "tiles"), [(3, 20, 97, (16, 16, 32, 1)),
                                                    (66, 20, 64, (32, 32, 64, 1))])  # fmt: skip
def test_gemm_fed_by_the_quantizer_matches_the_op_reference(rounding, m, n, k, tiles):
    g = torch.Generator().manual_seed(m)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    layer = QuantLinear.from_weight(w, torch.randn(n, generator=g), _scheme(rounding))
    x = _activation(m, k, torch.float32, seed=n)
    scaled = quantize_to_scaled_values(x.to(KERNEL_DEVICE), "mxfp4", None, rounding)
    weight = [t.to(KERNEL_DEVICE) for t in (layer.qweight, layer.scales, layer.bias)]
    bm, bn, bk, split_k = tiles
    config = cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, GROUP_M=8)
    got = microscaled_gemm(
        scaled, None, None, weight[0], weight[1], None, "mxfp4", k, weight[2], x.dtype, config
    )
    assert_matches(got.cpu(), layer.reference_forward(x))


def test_bad_roundings_are_refused_by_name():
    x = torch.randn(2, 32, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="scale_rounding must be one of"):
        quantize_kernel(x, "mxfp4", None, "nearest")
    with pytest.raises(ValueError, match="scale_rounding.*'nvfp4'"):
        quantize_kernel(x, "nvfp4", torch.ones(1, device=KERNEL_DEVICE), "compressed-tensors")

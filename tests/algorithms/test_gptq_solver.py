"""The fast GPTQ solver against a textbook column-by-column GPTQ, and its inverse-Hessian factor."""

import pytest
import torch

from torchquant.algorithms.gptq import (
    accumulate_hessian,
    factor_hessian,
    gptq_quantize,
    inverse_hessian_factor,
)
from torchquant.errors import QuantizationError
from torchquant.numerics import choose_int_qparams, dequantize_int_weight, group_min_max

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return (torch.randn(tokens, k, generator=g) @ mix) * torch.logspace(-1, 1, k)


def textbook_gptq(w, h, bits, group_size, act_order, static_groups, dampening=0.01):
    """GPTQ in float64 without lazy batches: every column updates all columns after it.

    Min/max group ranges: on the original contiguous groups (static) or taken where a
    group starts in visiting order.  Returns the dequantized weight in original order.
    """
    k = w.shape[1]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm].double(), h[perm][:, perm].double()
    h = h + dampening * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    gs = k if group_size == -1 else group_size
    static = None
    if static_groups or group_size == -1:
        lo, hi = group_min_max(w[:, torch.argsort(perm)].float(), group_size)
        static = choose_int_qparams(lo, hi, bits, False)
    out = torch.zeros_like(w)
    for j in range(k):
        if static is not None:
            g = int(perm[j]) // gs
            scale, zero = static[0][:, g : g + 1], static[1][:, g : g + 1]
        elif j % gs == 0:
            lo, hi = group_min_max(w[:, j : j + gs].float(), -1)
            scale, zero = choose_int_qparams(lo, hi, bits, False)
        s, z = scale.double(), zero.double()
        code = torch.clamp(torch.round(w[:, j : j + 1] / s) + z, 0, (1 << bits) - 1)
        out[:, j : j + 1] = (code - z) * s
        err = (w[:, j : j + 1] - out[:, j : j + 1]) / hinv[j, j]
        w[:, j:] -= err @ hinv[j : j + 1, j:]
    return out[:, torch.argsort(perm)].float()


def dequantized(res, bits, group_size):
    if res.g_idx is None:
        return dequantize_int_weight(res.codes, res.scales, res.zeros, bits, group_size)
    idx = res.g_idx.long()
    return (res.codes.float() - res.zeros[:, idx].float()) * res.scales[:, idx].float()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(
    "group_size, act_order, static_groups",
    [(-1, False, False), (24, False, False), (24, True, False), (24, True, True), (32, True, True)],
)
def test_fast_solver_equals_the_textbook_column_loop(bits, group_size, act_order, static_groups):
    """Lazy batches (blocks of 40 columns, chunks of 16 inside) only reorder float sums:
    the codes agree but where float32 vs float64 rounding flips a value near a tie."""
    torch.manual_seed(0)
    n, k = 24, 120  # 120 = 5 x 24 and 3 x 40 + 0: groups and blocks straddle each other
    w = torch.randn(n, k)
    h, _ = accumulate_hessian(None, 0, correlated_inputs(1024, k))
    res = gptq_quantize(w, h, bits, group_size, False, 40, 0.01, act_order, static_groups)
    fast = dequantized(res, bits, group_size)
    ref = textbook_gptq(w, h, bits, group_size, act_order, static_groups)
    differs = (fast - ref).abs() > 1e-4
    assert differs.float().mean() < 0.01
    # -- the objective GPTQ minimises, tr((W - Q) H (W - Q)^T), within 0.5%
    loss_fast = float(torch.einsum("nk,kj,nj->", fast - w, h, fast - w))
    loss_ref = float(torch.einsum("nk,kj,nj->", ref - w, h, ref - w))
    assert loss_fast == pytest.approx(loss_ref, rel=5e-3)


def test_block_and_chunk_sizes_do_not_change_the_maths():
    torch.manual_seed(2)
    w = torch.randn(16, 96)
    h, _ = accumulate_hessian(None, 0, correlated_inputs(512, 96, seed=2))
    args = (3, 32, False)
    whole = dequantized(gptq_quantize(w, h, *args, block_size=96), 3, 32)
    blocked = dequantized(gptq_quantize(w, h, *args, block_size=8), 3, 32)
    assert ((whole - blocked).abs() > 1e-4).float().mean() < 0.01


def test_inverse_hessian_factor_is_the_upper_factor_of_the_damped_inverse():
    k = 48
    h, _ = accumulate_hessian(None, 0, correlated_inputs(256, k))
    upper = inverse_hessian_factor(h, 0.01)
    assert upper.dtype == torch.float32 and torch.equal(upper, upper.triu())
    damped = h.double() + 0.01 * float(torch.diag(h).mean()) * torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(
        upper.double().t() @ upper.double(), torch.linalg.inv(damped), rtol=1e-4, atol=1e-6
    )


def test_a_singular_hessian_float32_cannot_factor_falls_back_to_float64():
    """A rank-32 projector in 128 columns with a damping just above its float32 rounding:
    float32 Cholesky breaks down, float64 factors it with the damping asked for."""
    k, dampening = 128, 1e-7
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    h = (q[:, :32] @ q[:, :32].t()).float()  # h: (K, K), eigenvalues 1 and 0
    damp = dampening * float(torch.diag(h).mean())
    assert int(torch.linalg.cholesky_ex((h + damp * torch.eye(k)).flip(0, 1)).info) != 0
    upper = inverse_hessian_factor(h, dampening)
    # -- U^T U is the inverse with the damping asked for (ten times more would be far off)
    want = torch.linalg.inv(h.double() + damp * torch.eye(k, dtype=torch.float64))
    got = upper.double().t() @ upper.double()
    assert float((got - want).norm() / want.norm()) < 1e-3


def test_a_hessian_no_damping_can_save_is_refused():
    h = torch.full((8, 8), float("nan")).fill_diagonal_(1.0)
    with pytest.raises(QuantizationError, match="not positive definite"):
        inverse_hessian_factor(h, 0.01, name="layer")


def test_a_shared_factor_gives_the_codes_of_a_fresh_one():
    """q/k/v share one factor of their Hessian: each result equals the unshared solve."""
    x = correlated_inputs(256, 64)
    h, _ = accumulate_hessian(None, 0, x)
    h[5, :] = h[:, 5] = 0.0  # -- a dead column: zeroed in every weight that shares the factor
    factor = factor_hessian(h, act_order=True, dampening=0.01, name="qkv")
    g = torch.Generator().manual_seed(4)
    for rows in (32, 16):
        w = torch.randn(rows, 64, generator=g)
        args = (w, h, 4, 16, False, 128, 0.01, True, True, "hessian_mse")
        fresh, shared = gptq_quantize(*args), gptq_quantize(*args, factor=factor)
        assert torch.equal(fresh.codes, shared.codes)
        assert torch.equal(fresh.scales, shared.scales) and torch.equal(fresh.zeros, shared.zeros)


def test_a_factor_made_with_other_settings_is_refused():
    h, _ = accumulate_hessian(None, 0, correlated_inputs(64, 16))
    factor = factor_hessian(h, act_order=False, dampening=0.01)
    with pytest.raises(QuantizationError, match="layer.*act_order=False"):
        gptq_quantize(torch.randn(4, 16), h, 4, act_order=True, name="layer", factor=factor)

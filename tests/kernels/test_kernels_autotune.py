"""Autotuning: decode and prefill token counts get separate tunings, each chosen once and cached,
and split-K outputs are right after the tuner has run every candidate into them.

Under the interpreter nothing can be timed, so the tuner's benchmark is replaced by one that
runs each candidate once (into the real output buffer) and reports a made-up time.
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    KERNEL_DEVICE,
    int_weight,
    poisoned,
    relative_error,
    requires_kernels,
    w8a8_case,
    weight_only_reference,
)
from torchquant.triton_kernels import act_quant, dequant_gemm, dequant_gemv, scaled_gemm, w8a8_gemm
from torchquant.triton_kernels._launch import autotune_benchmark, m_bucket
from torchquant.triton_kernels.fp8_gemm import fp8_gemm
from torchquant.triton_kernels.weight import QuantWeight

pytestmark = requires_kernels

TUNED = {
    "gemv": dequant_gemv._gemv_tuned,
    "dequant split-K": dequant_gemm._split_k_tuned,
    "dequant tiled": dequant_gemm._tiled_tuned,
    "int8 split-K": w8a8_gemm.int8_gemm.split_k_tuned,
    "int8 tiled": w8a8_gemm.int8_gemm.tiled_tuned,
    "fp8 split-K": fp8_gemm.split_k_tuned,
    "fp8 tiled": fp8_gemm.tiled_tuned,
    "act quant": act_quant._quantize_rows_tuned,
}


def test_decode_sizes_and_prefill_sizes_fall_in_separate_buckets():
    decode = {m: m_bucket(m) for m in range(1, 17)}
    assert set(decode.values()) == {1, 2, 4, 8, 16}
    assert all(m <= b < 2 * m for m, b in decode.items())
    assert {m_bucket(m) for m in (17, 64, 256, 4096)} == {32, 64, 256, 4096}
    assert m_bucket(100_000) == 8192  # one tuning for every very large prefill


@pytest.mark.parametrize("name", TUNED)
def test_every_tuned_kernel_is_keyed_on_the_token_bucket(name):
    assert "M_BUCKET" in TUNED[name].keys
    assert TUNED[name].keys[1:3] == ["N", "K"] or name == "act quant"
    assert TUNED[name]._do_bench is autotune_benchmark


def test_tuning_inside_a_cuda_graph_capture_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    ran = []
    with pytest.raises(RuntimeError, match="run the model once with the same shapes"):
        autotune_benchmark(lambda: ran.append(1), quantiles=(0.5, 0.2, 0.8))
    assert not ran  # nothing was timed (timing would synchronise inside the capture)


class _CountingBench:
    """Stands in for do_bench: runs the candidate once, says later candidates are faster."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fn, quantiles=None, **kwargs):
        fn()
        self.calls += 1
        return [1.0 / self.calls] * len(quantiles or (0,))


@pytest.fixture
def tuner(monkeypatch):
    """Route launches through the autotuner with a counting benchmark and an empty cache."""

    def use(tuned, modules, configs):
        bench = _CountingBench()
        monkeypatch.setitem(tuned.__dict__, "do_bench", bench)  # a cached_property
        monkeypatch.setattr(tuned, "cache", {})
        monkeypatch.setattr(tuned, "cache_results", False)  # no made-up timings on disk
        monkeypatch.setattr(tuned, "configs", configs)
        for module in modules:
            monkeypatch.setattr(module, "run_kernel", lambda k, grid, config, **a: k[grid](**a))
        return bench

    return use


def test_gemv_tunes_once_per_bucket_and_resets_its_atomics(tuner):
    tuned = dequant_gemv._gemv_tuned
    configs = [c for c in tuned.configs if c.kwargs["BLOCK_K"] == 128 and c.kwargs["SPLIT_K"] < 3]
    bench = tuner(tuned, [dequant_gemv], configs)
    assert len(configs) == 4
    qweight, scales, zeros, _ = int_weight(20, 512, 4, -1, False, torch.float32)
    benched = []
    for m in (1, 1, 2):
        x = torch.randn(m, 512, device=KERNEL_DEVICE)
        weight = QuantWeight(qweight, scales, zeros, 4, -1)
        out = dequant_gemv.dequant_gemv(x, weight, None, out=poisoned((m, 20), torch.float32))
        ref = weight_only_reference(x, qweight, scales, zeros, None, 4, -1)
        torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=1e-5)
        benched.append(bench.calls)
    assert benched == [4, 4, 8]  # the second M=1 call reuses the cached choice
    assert len(tuned.cache) == 2
    assert tuned.best_config == configs[-1] and configs[-1].kwargs["SPLIT_K"] == 2


def test_split_k_gemm_tunings_are_cached_per_bucket(tuner):
    bench = tuner(dequant_gemm._split_k_tuned, [dequant_gemm], dequant_gemm.SPLIT_K_CONFIGS[1:7:2])
    qweight, scales, zeros, _ = int_weight(24, 96, 4, 32, False, torch.float16)
    benched = []
    for m in (3, 16, 12, 4):  # buckets 4, 16, 16 (cached), 4 (cached)
        x = torch.randn(m, 96, device=KERNEL_DEVICE).to(torch.float16)
        weight = QuantWeight(qweight, scales, zeros, 4, 32)
        out = dequant_gemm.dequant_gemm(
            x, weight, None, split_k=True, out=poisoned((m, 24), x.dtype)
        )
        ref = weight_only_reference(x, qweight, scales, zeros, None, 4, 32)
        assert relative_error(out, ref) < 1e-2  # fp16 weights in the MMA; twice the sum is 1.0
        benched.append(bench.calls)
    assert benched == [3, 6, 6, 6]


def test_int8_split_k_result_is_right_after_tuning(tuner):
    bench = tuner(
        w8a8_gemm.int8_gemm.split_k_tuned, [scaled_gemm], scaled_gemm.SPLIT_K_CONFIGS[1:7:2]
    )
    x = torch.randn(5, 160, device=KERNEL_DEVICE)
    b = torch.randint(-128, 128, (40, 160), dtype=torch.int8, device=KERNEL_DEVICE)
    b_scale = torch.rand(40, 1, device=KERNEL_DEVICE) + 0.5
    bias = torch.randn(40, device=KERNEL_DEVICE)
    a, a_scale, ref = w8a8_case(x, (b, b_scale, bias), "int8", per_token=True)
    out = w8a8_gemm.int8_gemm(
        a, b, a_scale, b_scale, bias, torch.float32, out=poisoned((5, 40), torch.float32)
    )
    assert bench.calls == 3
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-3)

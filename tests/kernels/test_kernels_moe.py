"""The grouped mixture-of-experts kernel and its slot alignment vs the per-expert reference loop.

Ragged routing (experts with many, one or no slots, slots routed to no expert), top-1 and
top-2, one and sixteen tokens, bias, routing weights, K and N that no tile divides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from kernel_utils import KERNEL_DEVICE, assert_matches, cfg, int_weight, requires_kernels
from torchquant.triton_kernels.moe_gemm import (
    align_slots_by_expert,
    max_padded_slots,
    moe_block_m,
    moe_dequant_gemm,
    moe_dequant_gemv,
)
from torchquant.triton_kernels.weight import QuantWeight

from torchquant.numerics import quantize_fp8_weight
from torchquant.ops.moe import moe_linear_cuda, moe_linear_reference

pytestmark = requires_kernels

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
N, K = 38, 100  # neither divides any BLOCK_N, BLOCK_K or the group sizes below

# (name, bits, group_size, symmetric): packed INT widths, INT8 bytes, FP8 (group_size -1/0)
FORMATS = [
    ("w4-g32", 4, 32, False),
    ("w4-channel-sym", 4, -1, True),
    ("w3-g48", 3, 48, False),
    ("int8-g64", 8, 64, True),
    ("fp8-channel", 8, -1, None),
    ("fp8-tensor", 8, 0, None),
]


def stacked_weight(
    experts: int, bits: int, group_size: int, symmetric: bool | None, k: int = K
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(qweight, scales, zeros)`` of ``experts`` random ``(N, k)`` weights stacked along dim 0."""
    parts = []
    for _ in range(experts):
        if symmetric is None:
            q, s = quantize_fp8_weight(torch.randn(N, k), per_channel=group_size == -1)
            parts.append((q.to(KERNEL_DEVICE), s.reshape(-1, 1).to(KERNEL_DEVICE), None))
        else:
            parts.append(int_weight(N, k, bits, group_size, symmetric, torch.float16)[:3])
    qweight, scales, zeros = zip(*parts, strict=True)
    return (
        torch.stack(qweight),
        torch.stack(scales),
        None if zeros[0] is None else torch.stack(zeros),
    )


def ragged_routing(tokens: int, top_k: int, experts: int) -> torch.Tensor:
    """``(tokens, top_k)`` indices: expert 0 takes most slots, the last expert none, and one
    slot (when there are several) is routed to no expert (index ``experts``)."""
    gen = torch.Generator().manual_seed(tokens * 10 + top_k)
    index = torch.randint(0, experts - 1, (tokens, top_k), generator=gen)
    index[: tokens // 2, 0] = 0
    if tokens * top_k > 1:
        index[-1, -1] = experts
    return index.to(KERNEL_DEVICE)


@pytest.mark.parametrize(
    "tokens,top_k,experts,block_m",
    [(1, 1, 5, 4), (1, 2, 5, 4), (16, 1, 5, 4), (16, 2, 5, 4), (7, 2, 5, 16), (600, 2, 40, 16)],
)
def test_alignment_puts_each_slot_once_in_a_block_of_its_expert(tokens, top_k, experts, block_m):
    """The last case takes several steps of the alignment program (slots x runs > 8192)."""
    index = ragged_routing(tokens, top_k, experts)
    blocks = align_slots_by_expert(index, experts, block_m)
    slots = tokens * top_k
    size = max_padded_slots(slots, experts, block_m)
    assert blocks.sorted_slots.shape == (size,) and blocks.block_experts.shape == (size // block_m,)
    sorted_slots = blocks.sorted_slots.cpu().long()
    used = int(blocks.padded_slots)
    real = sorted_slots[sorted_slots < slots]
    assert torch.equal(real.sort().values, torch.arange(slots))  # every slot exactly once
    assert (sorted_slots[used:] == slots).all()  # unused entries hold the sentinel
    expert_of_slot = index.reshape(-1).cpu()
    counts = torch.bincount(expert_of_slot, minlength=experts + 1)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())
    block_of_entry = blocks.block_experts.cpu().long().repeat_interleave(block_m)
    is_slot = sorted_slots < slots
    assert torch.equal(block_of_entry[is_slot], expert_of_slot[sorted_slots[is_slot]])
    assert (blocks.block_experts.cpu()[used // block_m :] == experts).all()
    assert experts - 1 not in blocks.block_experts.cpu().tolist()  # no tokens: no block
    for e in range(experts + 1):  # slots of one expert keep their order
        run = sorted_slots[is_slot & (block_of_entry == e)]
        assert torch.equal(run, run.sort().values)


def test_alignment_of_no_slots_is_empty():
    blocks = align_slots_by_expert(torch.zeros(0, 2, dtype=torch.long), 4, 16)
    assert blocks.sorted_slots.numel() == 0 and int(blocks.padded_slots) == 0


def reference(x, qweight, scales, zeros, bias, index, weights, bits, group_size):
    args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in (x, qweight, scales, zeros)]
    extra = [t.cpu() if t is not None else None for t in (bias, index, weights)]
    return moe_linear_reference(*args, *extra, bits, group_size)


@pytest.mark.parametrize("name,bits,group_size,symmetric", FORMATS)
@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 2), (16, 2)])
def test_grouped_kernel_matches_the_per_expert_loop(
    name, bits, group_size, symmetric, tokens, top_k
):
    experts = 4
    qweight, scales, zeros = stacked_weight(experts, bits, group_size, symmetric)
    index = ragged_routing(tokens, top_k, experts)
    weights = torch.rand(tokens, top_k, device=KERNEL_DEVICE)
    x = torch.randn(tokens, K, dtype=torch.float16, device=KERNEL_DEVICE)
    for routing_weights in (None, weights):
        args = (x, qweight, scales, zeros, None, index, routing_weights, bits, group_size)
        out = moe_linear_cuda(*args)
        assert out.shape == (tokens * top_k, N) and out.dtype == torch.float16
        assert_matches(out, reference(*args))
        if tokens * top_k > 1:  # the slot routed to no expert is zero
            assert (out[-1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_per_slot_bias_and_explicit_configs(dtype):
    """The second projection's input (a row per slot), a bias per expert, and tiles whose
    BLOCK_K does not divide the groups (per-element scales) or does (one per tile)."""
    experts, tokens, top_k = 3, 16, 2
    qweight, scales, zeros = stacked_weight(experts, 4, 32, False)
    bias = torch.randn(experts, N, device=KERNEL_DEVICE).to(dtype)
    index = ragged_routing(tokens, top_k, experts)
    weights = torch.rand(tokens, top_k, device=KERNEL_DEVICE)
    x = torch.randn(tokens * top_k, K, dtype=dtype, device=KERNEL_DEVICE)
    want = reference(x, qweight, scales, zeros, bias, index, weights, 4, 32)
    weight = QuantWeight(qweight, scales, zeros, 4, 32)
    for block_m, config in [
        (16, cfg(BLOCK_N=32, BLOCK_K=64, GROUP_M=1)),
        (32, cfg(BLOCK_N=16, BLOCK_K=32, GROUP_M=4)),
    ]:
        blocks = align_slots_by_expert(index, experts, block_m)
        out = moe_dequant_gemm(x, weight, bias, blocks, weights, config)
        assert_matches(out, want)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("split_k", [1, 2])
def test_one_token_runs_the_grouped_gemv(symmetric, split_k):
    """Decode: the 4-bit one-thread-per-row GEMV (K a multiple of 32, groups of 32) over the
    token's slots, split over K through the self-resetting counters, an unrouted slot zero."""
    experts, top_k = 4, 2
    qweight, scales, zeros = stacked_weight(experts, 4, 32, symmetric, k=128)
    index = torch.tensor([[2, experts]], device=KERNEL_DEVICE)
    weights = torch.rand(1, top_k, device=KERNEL_DEVICE)
    config = cfg(BLOCK_N=256, BLOCK_K=32, SPLIT_K=split_k, num_stages=1)
    weight = QuantWeight(qweight, scales, zeros, 4, 32)
    for x in (torch.randn(1, 128), torch.randn(top_k, 128)):  # a row per token, per slot
        x = x.to(torch.float16).to(KERNEL_DEVICE)
        for routing_weights in (None, weights):
            out = moe_dequant_gemv(x, weight, index, routing_weights, config)
            args = (x, qweight, scales, zeros, None, index, routing_weights, 4, 32)
            want = reference(*args)
            assert_matches(out, want)
            assert (out[1] == 0).all() and out[0].abs().max() > 0


def test_block_rows_follow_the_slots_per_expert():
    assert moe_block_m(2, 8) == 16 and moe_block_m(32, 8) == 16
    assert moe_block_m(4096, 8) == 64


def test_launcher_refuses_mismatched_inputs():
    qweight, scales, zeros = stacked_weight(2, 4, 32, False)
    index = torch.zeros(3, 2, dtype=torch.long, device=KERNEL_DEVICE)
    blocks = align_slots_by_expert(index, 2, 16)
    x = torch.randn(5, K, dtype=torch.float16, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="one row per token or per slot"):
        moe_dequant_gemm(x, QuantWeight(qweight, scales, zeros, 4, 32), None, blocks)
    with pytest.raises(ValueError, match="stacked"):
        moe_dequant_gemm(x[:3], QuantWeight(qweight, scales, zeros, 4, 32).expert(0), None, blocks)


NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(
    not all(os.access(NVIDIA_BIN / tool, os.X_OK) for tool in ("ptxas", "nvdisasm", "cuobjdump")),
    reason="the compile-only path needs Triton's NVIDIA backend tools",
)
def test_grouped_projection_stays_inside_its_budget_on_sm90():
    """The cost model's MoE rows (benchmarks/kernel_model.py --moe, compiled for sm_90 with no
    GPU): one token's W4 projection is one launch of the grouped GEMV (its density: 0.12
    warp-instructions per weight), sixteen tokens' two (alignment, GEMM: 16-row MMA tiles,
    0.30 per weight); no spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    args = ["--json", "--quick", "--moe", "--schemes", "w4a16", "--shapes", "4096x4096"]
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "kernel_model.py"), *args, "--batches", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [r for r in json.loads(done.stdout) if r["scheme"] == "moe-w4a16"]
    grouped = [r for r in rows if r["path"] == "grouped"]
    assert len(grouped) == 4  # gate_up and down, 1 and 16 tokens
    for row in grouped:
        name = f"{row['projection']} tokens={row['M']} {row['config']}"
        launches, density = (1, 0.125) if row["M"] == 1 else (2, 0.31)
        assert row["launches"] == launches, name
        assert row["spill_bytes"] == 0, name
        assert 0 < row["instr_per_weight"] <= density, (name, row["loop_per_iteration"])
    loop = {(r["projection"], r["M"]): r["launches"] for r in rows if r["path"] == "per-expert"}
    assert loop[("gate_up", 16)] > 2  # what the grouped kernel saves: launches per expert

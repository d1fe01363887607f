"""The torch LoRA op against the fp32 reference loop (tests/engine/lora_reference.py), over ranks,
batch layouts and dtypes; and the stacked slots it reads. `python -m tests.engine.test_lora_op` runs
the decode micro-benchmark."""

from __future__ import annotations

import pytest
import torch

from engine.config import LORA_MODULES
from engine.lora_op import TorchLoraOp, build_lora_op
from engine.lora_slots import LoraSlots
from tests.engine.lora_reference import (
    ATTN,
    LAYOUTS,
    filled_slots,
    make_spec,
    make_weights,
    reference_lora,
)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_op_matches_reference(dtype, layout, device):
    spec = make_spec()
    slots = filled_slots(spec, dtype, device)
    op = TorchLoraOp(slots)
    seg_lens, seg_slots = LAYOUTS[layout]
    T = sum(seg_lens)
    base_rows = torch.tensor([s < 0 for n, s in zip(seg_lens, seg_slots, strict=True) for _ in range(n)])
    g = torch.Generator().manual_seed(1)
    for mode in (torch.no_grad, torch.inference_mode):  # the second run reuses the cached gather
        with mode():
            batch = op.prepare(seg_lens, seg_slots)
            for layer in range(spec.num_layers):
                x = torch.randn(T, spec.hidden_size, generator=g).to(dtype)
                for module in LORA_MODULES:
                    fan_in, fan_out = spec.module_shapes[module]
                    xm = x if fan_in == spec.hidden_size else torch.randn(T, fan_in, generator=g).to(dtype)
                    y0 = torch.randn(T, fan_out, generator=g).to(dtype)
                    y = y0.to(device, copy=True)
                    op.apply(y, xm.to(device), layer, module, batch)
                    y = y.cpu()
                    expect = y0.float() + reference_lora(xm, slots, layer, module, seg_lens, seg_slots)
                    scale = max(1.0, expect.abs().max().item())
                    tol = TOL[dtype]
                    torch.testing.assert_close(y.float(), expect, rtol=tol["rtol"], atol=tol["atol"] * scale)
                    assert torch.equal(y[base_rows], y0[base_rows]), "base-only rows must not change"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_load_is_read_by_the_next_op():
    """LoraSlots.load copies pinned weights asynchronously; an op issued right after on the same
    stream reads the new weights."""
    spec = make_spec()
    slots = LoraSlots(spec, 2, 64, "cuda", torch.bfloat16)
    op = TorchLoraOp(slots)
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    for seed in range(3):
        slots.load(1, make_weights(spec, 64, ATTN, seed=seed, dtype=torch.bfloat16).pin_memory())
        y = torch.zeros(4, 64, device="cuda", dtype=torch.bfloat16)
        op.apply(y, x, 2, "q_proj", op.prepare([4], [1]))
        ref = reference_lora(x, slots, 2, "q_proj", [4], [1])
        torch.testing.assert_close(y.float().cpu(), ref, rtol=0, atol=3e-2 * ref.abs().max().item())


@pytest.mark.parametrize("layout,alone,padded,scattered", [
    ("decode_distinct", 0, False, False), ("decode_grouped", 0, True, False), ("prefill", 0, True, True),
    ("prefill_equal", 0, False, False), ("prefill_unequal", 0, True, False), ("mixed", 2, True, True),
    ("one_long", 0, False, False), ("base_only", 0, False, False)])
def test_path_choice(layout, alone, padded, scattered):
    """Padded bmm unless padding to the longest segment would more than double the work; no
    gather when the segments are consecutive and of one length, no scatter when consecutive."""
    op = TorchLoraOp(filled_slots(make_spec(), torch.float32))
    batch = op.prepare(*LAYOUTS[layout])
    if layout == "base_only":
        assert not batch.active and batch.plan is None
        return
    plan = batch.plan
    assert len(plan.long) == alone
    assert plan.short_rank > 0
    assert (plan.gather is not None) == padded
    assert (plan.scatter is not None) == scattered


def test_ranks_and_lazy_allocation():
    spec = make_spec()
    slots = LoraSlots(spec, 4, 16, "cpu", torch.float32)
    assert slots.nbytes == 0 and not slots.has_module("q_proj")
    slots.load(0, make_weights(spec, 8, ("q_proj", "v_proj")))
    assert set(slots.A) == {"q_proj", "v_proj"}, "only targeted modules are allocated"
    assert slots.A["q_proj"].shape == (3, 4, 16, 64) and slots.B["v_proj"].shape == (3, 4, 32, 16)
    assert slots.ranks == [8, 0, 0, 0]
    # a later adapter without q_proj in the same slot leaves no trace of the old one
    slots.load(0, make_weights(spec, 4, ("down_proj",), seed=3))
    assert slots.A["q_proj"][:, 0].abs().sum() == 0 and slots.B["q_proj"][:, 0].abs().sum() == 0
    assert slots.A["down_proj"][:, 0, 4:].abs().sum() == 0, "padding rows stay zero"
    with pytest.raises(ValueError):
        slots.load(1, make_weights(spec, 32))


def test_layers_not_targeted_are_zero():
    spec = make_spec()
    slots = LoraSlots(spec, 2, 8, "cpu", torch.float32)
    slots.load(1, make_weights(spec, 8, ("q_proj",), layers=[1]))
    op = TorchLoraOp(slots)
    batch = op.prepare([1, 1], [1, 1])
    x = torch.randn(2, 64)
    y = torch.zeros(2, 64)
    op.apply(y, x, 0, "q_proj", batch)
    assert y.abs().sum() == 0
    op.apply(y, x, 1, "q_proj", batch)
    assert y.abs().sum() > 0


def test_cache_invalidated_when_slot_reloaded():
    spec = make_spec()
    slots = filled_slots(spec, torch.float32)
    op = TorchLoraOp(slots)
    seg_lens, seg_slots = [1, 1, 1], [0, 2, 1]
    x = torch.randn(3, 64)

    def run():
        batch = op.prepare(seg_lens, seg_slots)
        y = torch.zeros(3, 64)
        op.apply(y, x, 1, "q_proj", batch)
        return y, batch

    y1, b1 = run()
    y2, b2 = run()
    assert b2.plan.weights is b1.plan.weights, "gather reused"
    assert (1, ("q_proj", "k_proj", "v_proj")) in b2.plan.weights
    torch.testing.assert_close(y1, y2)
    slots.load(2, make_weights(spec, 16, ATTN, seed=99))  # reload a slot the batch uses
    y3, b3 = run()
    assert b3.plan.weights is b1.plan.weights  # the reloaded slot's row is copied again, in place
    torch.testing.assert_close(y3, reference_lora(x, slots, 1, "q_proj", seg_lens, seg_slots), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y3, y1)
    slots.load(5, make_weights(spec, 4, ATTN, seed=7))  # a slot the batch does not use: cache kept
    _, b4 = run()
    assert b4.plan.weights is b3.plan.weights


def test_fused_shrink_needs_the_same_x():
    """q/k/v share one shrink only when they really get the same x (same storage, no in-place change)."""
    spec = make_spec()
    slots = filled_slots(spec, torch.float32)
    op = TorchLoraOp(slots)
    seg_lens, seg_slots = [1, 1, 1, 1], [0, 1, 3, 2]
    batch = op.prepare(seg_lens, seg_slots)
    x = torch.randn(4, 64)
    qkv = torch.zeros(4, 64 + 32 + 32)
    q, k, v = qkv[:, :64], qkv[:, 64:96], qkv[:, 96:]  # column views, as the runner passes them
    op.apply(q, x, 0, "q_proj", batch)
    x2 = torch.randn(4, 64)
    op.apply(k, x2, 0, "k_proj", batch)  # a different x: must not reuse q's shrink
    x.mul_(2)  # in-place change: must not reuse either
    op.apply(v, x, 0, "v_proj", batch)
    torch.testing.assert_close(q, reference_lora(x / 2, slots, 0, "q_proj", seg_lens, seg_slots), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k, reference_lora(x2, slots, 0, "k_proj", seg_lens, seg_slots), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v, reference_lora(x, slots, 0, "v_proj", seg_lens, seg_slots), rtol=1e-4, atol=1e-4)


def test_x_in_another_dtype_and_unallocated_module():
    spec = make_spec()
    slots = LoraSlots(spec, 2, 8, "cpu", torch.bfloat16)
    slots.load(0, make_weights(spec, 8, ("q_proj",), dtype=torch.bfloat16))
    slots.load(1, make_weights(spec, 4, ("q_proj",), seed=1, dtype=torch.bfloat16))
    op = build_lora_op("torch", slots)
    layout = ([1, 30, 1], [0, 1, 0])
    batch = op.prepare(*layout)
    assert batch.plan.long and batch.plan.short_rank, "both paths"
    x = torch.randn(32, 64)
    y = torch.zeros(32, 64)
    op.apply(y, x, 0, "q_proj", batch)  # fp32 activations, bf16 slots
    ref = reference_lora(x.bfloat16(), slots, 0, "q_proj", *layout)
    torch.testing.assert_close(y, ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
    y = torch.zeros(32, 96)
    op.apply(y, x, 0, "gate_proj", batch)  # no adapter targets it: no-op
    assert y.abs().sum() == 0
    assert not op.prepare([2], [-1]).active
    with pytest.raises(ValueError):
        build_lora_op("cuda", slots)


def test_auto_backend_is_torch_on_cpu():
    """The CPU path stays the torch op, whatever is installed; the config refuses unknown names."""
    from engine.config import EngineConfig

    slots = LoraSlots(make_spec(), 2, 8, "cpu", torch.float32)
    assert type(build_lora_op("auto", slots)) is TorchLoraOp
    assert EngineConfig().lora_backend == "auto"
    with pytest.raises(ValueError, match="lora_backend"):
        EngineConfig(lora_backend="cuda")


# ---- micro-benchmark (not a test): python -m tests.engine.test_lora_op ---------------------

def bench(dtype=torch.float32, batch_size=32, rank=16, reps=15) -> None:
    """One SmolLM2-135M decode step's projections (hidden 576, kv 192, inter 1536, 30 layers) at
    batch 32, base only vs base + 32 distinct rank-`rank` adapters on q/k/v/o, interleaved."""
    import statistics
    import time

    import torch.nn.functional as F

    H, KV, INTER, L = 576, 192, 1536, 30
    spec = make_spec(L, H, KV, INTER)
    qkv_w = [torch.randn(H + 2 * KV, H, dtype=dtype) * 0.02 for _ in range(L)]
    o_w = [torch.randn(H, H, dtype=dtype) * 0.02 for _ in range(L)]
    gu_w = [torch.randn(2 * INTER, H, dtype=dtype) * 0.02 for _ in range(L)]
    d_w = [torch.randn(H, INTER, dtype=dtype) * 0.02 for _ in range(L)]
    slots = LoraSlots(spec, batch_size, 64, "cpu", dtype)
    for s in range(batch_size):
        slots.load(s, make_weights(spec, rank, ATTN, seed=s, dtype=dtype, std=0.01))
    op = TorchLoraOp(slots)
    x = torch.randn(batch_size, H, dtype=dtype)
    m = torch.randn(batch_size, INTER, dtype=dtype)

    def step(batch) -> None:
        for i in range(L):
            qkv = F.linear(x, qkv_w[i])
            if batch is not None:
                op.apply(qkv[:, :H], x, i, "q_proj", batch)
                op.apply(qkv[:, H:H + KV], x, i, "k_proj", batch)
                op.apply(qkv[:, H + KV:], x, i, "v_proj", batch)
            y = F.linear(x, o_w[i])
            if batch is not None:
                op.apply(y, x, i, "o_proj", batch)
            F.linear(x, gu_w[i])
            F.linear(m, d_w[i])

    layout = ([1] * batch_size, list(range(batch_size)))
    t0 = time.perf_counter()
    batch = op.prepare(*layout)
    step(batch)
    first = time.perf_counter() - t0
    base, lora = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(None)
        base.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step(op.prepare(*layout))
        lora.append(time.perf_counter() - t0)
    b, lo = min(base) * 1e3, min(lora) * 1e3  # min: the least disturbed run of each
    paired = statistics.median(y - x for x, y in zip(base, lora, strict=True)) * 1e3  # robust to a busy machine
    print(f"{dtype}, batch {batch_size}, {batch_size} distinct rank-{rank} q/k/v/o adapters, "
          f"{torch.get_num_threads()} threads: projections base {b:.1f} ms, +lora {lo:.1f} ms "
          f"(+{100 * (lo - b) / b:.0f}%; median paired difference +{paired:.1f} ms); "
          f"first step after a batch change (gather) {first * 1e3:.1f} ms")


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1:  # threads (a busy machine makes 2-thread OpenMP timings erratic)
        torch.set_num_threads(int(sys.argv[1]))
    bench(torch.float32)
    bench(torch.bfloat16)

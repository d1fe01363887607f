"""The batched LoRA op against the plain fp32 reference loop, over ranks, batch layouts and dtypes;
and the stacked slots it reads. `python -m tests.test_lora_op` runs the decode micro-benchmark."""

from __future__ import annotations

import pytest
import torch

from engine.adapter import AdapterWeights
from engine.config import LORA_MODULES
from engine.lora_op import TorchLoraOp, build_lora_op, reference_lora
from engine.lora_slots import LoraSlots
from engine.model_loader import ModelSpec

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_spec(layers=3, hidden=64, kv=32, inter=96) -> ModelSpec:
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    return ModelSpec("llama", layers, hidden, shapes, "tiny")


def make_weights(spec: ModelSpec, rank: int, modules=ATTN, seed=0, dtype=torch.float32, layers=None,
                 std=0.3) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers if layers is not None else range(spec.num_layers):
        for m in modules:
            fan_in, fan_out = spec.module_shapes[m]
            out[(layer, m)] = ((torch.randn(fan_in, rank, generator=g) * std).to(dtype),
                               (torch.randn(rank, fan_out, generator=g) * std).to(dtype))
    nbytes = sum(a.nbytes + b.nbytes for a, b in out.values())
    return AdapterWeights(f"w{seed}", rank, out, nbytes)


# slot -> (rank, modules): mixed ranks, attention-only and all-linear adapters in one slot table
SLOT_TABLE = {0: (1, ATTN), 1: (4, LORA_MODULES), 2: (16, ("q_proj", "v_proj")), 3: (64, LORA_MODULES),
              4: (16, ("down_proj", "o_proj"))}
LAYOUTS = {
    "decode_distinct": ([1] * 6, [0, 1, 2, 3, 4, -1]),
    "decode_all_adapters": ([1] * 5, [3, 0, 4, 1, 2]),
    "decode_gaps": ([1] * 6, [0, -1, 1, -1, 2, 3]),
    "decode_grouped": ([2, 1, 3, 1, 5], [-1, 0, 1, 3, 2]),
    "prefill": ([20, 9, 13, 8], [1, -1, 3, 0]),
    "prefill_equal": ([3, 7, 7, 7], [-1, 2, 0, 1]),
    "prefill_unequal": ([4, 9, 6, 5], [-1, 1, 0, 3]),
    "mixed": ([17, 1, 1, 3, 12, 1], [2, 3, -1, 1, 4, 0]),
    "base_only": ([4, 2], [-1, -1]),
    "one_long": ([30], [3]),
}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def filled_slots(spec, dtype, num_slots=6, max_rank=64) -> LoraSlots:
    slots = LoraSlots(spec, num_slots, max_rank, "cpu", dtype)
    for slot, (rank, modules) in SLOT_TABLE.items():
        slots.load(slot, make_weights(spec, rank, modules, seed=slot, dtype=dtype))
    return slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_op_matches_reference(dtype, layout):
    spec = make_spec()
    slots = filled_slots(spec, dtype)
    op = TorchLoraOp(slots)
    seg_lens, seg_slots = LAYOUTS[layout]
    T = sum(seg_lens)
    base_rows = torch.tensor([s < 0 for n, s in zip(seg_lens, seg_slots) for _ in range(n)])
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
                    y = y0.clone()
                    op.apply(y, xm, layer, module, batch)
                    expect = y0.float() + reference_lora(xm, slots, layer, module, seg_lens, seg_slots)
                    scale = max(1.0, expect.abs().max().item())
                    tol = TOL[dtype]
                    torch.testing.assert_close(y.float(), expect, rtol=tol["rtol"], atol=tol["atol"] * scale)
                    assert torch.equal(y[base_rows], y0[base_rows]), "base-only rows must not change"


@pytest.mark.parametrize("layout,alone,padded,scattered", [
    ("decode_distinct", 0, False, False), ("decode_grouped", 0, True, False), ("prefill", 0, True, True),
    ("prefill_equal", 0, False, False), ("prefill_unequal", 0, True, False), ("mixed", 2, True, True),
    ("one_long", 0, False, False), ("base_only", 0, False, False)])
def test_path_choice(layout, alone, padded, scattered):
    """Padded bmm unless padding to the longest segment would more than double the work; no
    gather when the segments are consecutive and of one length, no scatter when consecutive."""
    op = TorchLoraOp(filled_slots(make_spec(), torch.float32))
    batch = op.prepare(*LAYOUTS[layout])
    assert len(batch.long) == alone
    assert (batch.short_rank > 0) == (layout != "base_only")
    assert (batch.gather is not None) == padded
    assert (batch.scatter is not None) == scattered


def test_ranks_and_lazy_allocation():
    spec = make_spec()
    slots = LoraSlots(spec, 4, 16, "cpu", torch.float32)
    assert slots.nbytes == 0 and not slots.has_module("q_proj")
    slots.load(0, make_weights(spec, 8, ("q_proj", "v_proj")))
    assert set(slots.A) == {"q_proj", "v_proj"}, "only targeted modules are allocated"
    assert slots.A["q_proj"].shape == (3, 4, 64, 16) and slots.B["v_proj"].shape == (3, 4, 16, 32)
    assert slots.ranks == [8, 0, 0, 0]
    # a later adapter without q_proj in the same slot leaves no trace of the old one
    slots.load(0, make_weights(spec, 4, ("down_proj",), seed=3))
    assert slots.A["q_proj"][:, 0].abs().sum() == 0 and slots.B["q_proj"][:, 0].abs().sum() == 0
    assert slots.A["down_proj"][:, 0, :, 4:].abs().sum() == 0, "padding columns stay zero"
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
    assert b2.weights is b1.weights and (1, ("q_proj", "k_proj", "v_proj")) in b2.weights, "gather reused"
    torch.testing.assert_close(y1, y2)
    slots.load(2, make_weights(spec, 16, ATTN, seed=99))  # reload a slot the batch uses
    y3, b3 = run()
    assert b3.weights is not b1.weights
    torch.testing.assert_close(y3, reference_lora(x, slots, 1, "q_proj", seg_lens, seg_slots), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y3, y1)
    slots.load(5, make_weights(spec, 4, ATTN, seed=7))  # a slot the batch does not use: cache kept
    _, b4 = run()
    assert b4.weights is b3.weights


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
    assert batch.long and batch.short_rank, "both paths"
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
        build_lora_op("triton", slots)


# ---- micro-benchmark (not a test): python -m tests.test_lora_op ----------------------------

def bench(dtype=torch.float32, batch_size=32, rank=16, reps=15) -> None:
    """One SmolLM2-135M decode step's projections (hidden 576, kv 192, inter 1536, 30 layers) at
    batch 32, base only vs base + 32 distinct rank-`rank` adapters on q/k/v/o, interleaved."""
    import statistics
    import time

    import torch.nn.functional as F

    H, KV, I, L = 576, 192, 1536, 30
    spec = ModelSpec("llama", L, H, {"q_proj": (H, H), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (H, H),
                                     "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}, "smollm2")
    qkv_w = [torch.randn(H + 2 * KV, H, dtype=dtype) * 0.02 for _ in range(L)]
    o_w = [torch.randn(H, H, dtype=dtype) * 0.02 for _ in range(L)]
    gu_w = [torch.randn(2 * I, H, dtype=dtype) * 0.02 for _ in range(L)]
    d_w = [torch.randn(H, I, dtype=dtype) * 0.02 for _ in range(L)]
    slots = LoraSlots(spec, batch_size, 64, "cpu", dtype)
    for s in range(batch_size):
        slots.load(s, make_weights(spec, rank, ATTN, seed=s, dtype=dtype, std=0.01))
    op = TorchLoraOp(slots)
    x = torch.randn(batch_size, H, dtype=dtype)
    m = torch.randn(batch_size, I, dtype=dtype)

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
    paired = statistics.median(y - x for x, y in zip(base, lora)) * 1e3  # robust to a busy machine
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

"""TorchLoraOp keeps the weights it gathered for its padded bmm between steps, one row per segment:
when the batch's segments change by a few slots, only those rows are copied again, and `order`
keeps every other slot at its row. Checked against the fp32 reference loop (lora_reference.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.config import LORA_MODULES
from engine.lora_op import TorchLoraOp
from engine.lora_slots import LoraSlots
from tests.engine.lora_reference import make_spec, make_weights, reference_lora

SPEC = make_spec()


def rank8_slots(num_slots: int = 8, dtype: torch.dtype = torch.float32) -> LoraSlots:
    """Slots 0..num_slots-2 hold rank-8 all-linear adapters; the last is empty."""
    slots = LoraSlots(SPEC, num_slots, 16, "cpu", dtype)
    for s in range(num_slots - 1):
        slots.load(s, make_weights(SPEC, 8, LORA_MODULES, seed=s, dtype=dtype))
    return slots


def check(op: TorchLoraOp, reference: LoraSlots, seg_lens: list[int], seg_slots: list[int], seed: int = 0) -> None:
    """Prepare the layout and apply every module of every layer: each delta equals the reference
    loop's over `reference` (the weights the op should be reading)."""
    batch = op.prepare(seg_lens, seg_slots)
    g = torch.Generator().manual_seed(seed)
    t = sum(seg_lens)
    for layer in range(SPEC.num_layers):
        for module in LORA_MODULES:
            fan_in, fan_out = SPEC.module_shapes[module]
            x = torch.randn(t, fan_in, generator=g).to(op.slots.dtype)
            y0 = torch.randn(t, fan_out, generator=g).to(op.slots.dtype)
            y = y0.clone()
            op.apply(y, x, layer, module, batch)
            expect = y0.float() + reference_lora(x, reference, layer, module, seg_lens, seg_slots)
            tol = 1e-4 if op.slots.dtype == torch.float32 else 3e-2
            torch.testing.assert_close(y.float(), expect, rtol=tol, atol=tol * max(1.0, expect.abs().max().item()))


def poison(slots: LoraSlots, slot_ids: list[int]) -> None:
    """Change those slots' weights in place without a new version: a row copied again from them
    would give a wrong delta, so a test that still matches the old weights shows it was not."""
    for m in slots.A:
        slots.A[m][:, slot_ids] *= -3.0


def test_order_keeps_slots_at_their_rows():
    op = TorchLoraOp(rank8_slots())
    assert op.order([4, 1, 2]) == [1, 2, 4]  # nothing gathered yet: ascending
    op.prepare([1] * 4, [3, 5, 0, 6])
    assert op.order([0, 3, 5, 6]) == [3, 5, 0, 6]  # unchanged batch: unchanged order
    assert op.order([0, 3, 6]) == [3, 6, 0]  # 5 leaves: the last row moves up into its row
    assert op.order([0, 1, 3, 5, 6]) == [3, 5, 0, 6, 1]  # 1 joins: after the others
    assert op.order([0, 1, 2, 3, 4, 5]) == [3, 5, 0, 1, 2, 4]
    assert op.order([]) == []


def test_joins_leaves_and_reloads_copy_only_their_rows():
    slots = rank8_slots()
    op = TorchLoraOp(slots)
    decode = op.order([0, 1, 2])
    check(op, slots, [1] * 3, decode)  # rows for 4 segments are allocated: room for one to join
    copied = copy.deepcopy(slots)  # what the rows now hold
    poison(slots, [0, 1, 2])

    decode = op.order([0, 1, 2, 4])  # 4 joins: a new row; 0..2 are not copied again
    assert decode == [0, 1, 2, 4]
    check(op, copied, [1] * 4, decode, seed=1)

    decode = op.order([0, 2, 4])  # 1 leaves: 4 moves up into its row
    assert decode == [0, 4, 2]
    check(op, copied, [1] * 3, decode, seed=2)

    new = make_weights(SPEC, 8, LORA_MODULES, seed=40)
    slots.load(2, new)  # a new version of slot 2: its row is copied again, the others are not
    copied.load(2, new)
    check(op, copied, [1] * 3, decode, seed=3)

    # a prompt chunk after the decode rows: a short one shares the bmm (a second row of slot 4),
    # a long one runs alone on its slot's own view (slot 5: not poisoned)
    check(op, copied, [1, 1, 1, 2], [*decode, 4], seed=4)
    check(op, copied, [2, 1, 1, 1, 30], [-1, *decode, 5], seed=5)
    check(op, copied, [1] * 3, decode, seed=6)


def test_rank_change_and_growth_copy_everything_again():
    slots = rank8_slots()
    op = TorchLoraOp(slots)
    for n in range(1, 7):  # the bmm rows outgrow their capacity at 2, 3 and 5
        check(op, slots, [1] * n, op.order(list(range(n))), seed=n)
    poison(slots, [0, 1])  # seen once a rebuild copies every row again
    slots.load(7, make_weights(SPEC, 16, ("q_proj", "o_proj"), seed=70))  # a higher rank: rows cut wider
    check(op, slots, [1] * 7, op.order(list(range(6)) + [7]), seed=9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_copied_in_and_out_of_inference_mode(dtype):
    """The engine prepares under inference mode; tests and tools may not: rows copied under one
    are copied again under the other (in-place updates of inference tensors are refused outside it)."""
    slots = rank8_slots(dtype=dtype)
    op = TorchLoraOp(slots)
    with torch.inference_mode():
        check(op, slots, [1, 1, 1], op.order([0, 1, 2]))
    check(op, slots, [1, 1, 1], op.order([0, 1, 3]), seed=1)
    with torch.no_grad():
        check(op, slots, [1, 2, 1, 1], [-1, *op.order([1, 2, 3])], seed=2)

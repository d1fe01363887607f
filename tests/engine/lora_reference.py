"""The fp32 reference loop every LoRA backend is tested against, and the slot table and batch
layouts those tests share (tests/engine/test_lora_op.py, tests/engine/test_lora_triton.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from engine.adapter import AdapterWeights
from engine.config import LORA_MODULES
from engine.lora_slots import LoraSlots
from engine.model_loader import ModelSpec

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
# slot -> (rank, modules): mixed ranks, attention-only and all-linear adapters in one slot table
SLOT_TABLE = {0: (1, ATTN), 1: (4, LORA_MODULES), 2: (16, ("q_proj", "v_proj")), 3: (64, LORA_MODULES),
              4: (16, ("down_proj", "o_proj"))}
# name -> (seg_lens, seg_slots): the packings the runner makes (rows grouped by slot) and a few it does not
LAYOUTS = {
    "decode_distinct": ([1] * 6, [0, 1, 2, 3, 4, -1]),
    "decode_all_adapters": ([1] * 5, [3, 0, 4, 1, 2]),
    "decode_gaps": ([1] * 6, [0, -1, 1, -1, 2, 3]),
    "decode_grouped": ([2, 1, 3, 1, 5], [-1, 0, 1, 3, 2]),
    "prefill": ([20, 9, 13, 8], [1, -1, 3, 0]),
    "prefill_equal": ([3, 7, 7, 7], [-1, 2, 0, 1]),
    "prefill_unequal": ([4, 9, 6, 5], [-1, 1, 0, 3]),
    "mixed": ([17, 1, 1, 3, 12, 1], [2, 3, -1, 1, 4, 0]),
    "empty_segments": ([0, 3, 0, 2, 0], [1, 3, -1, 0, 2]),
    "base_only": ([4, 2], [-1, -1]),
    "one_long": ([30], [3]),
}


def make_spec(layers: int = 3, hidden: int = 64, kv: int = 32, inter: int = 96) -> ModelSpec:
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    return ModelSpec("llama", layers, hidden, shapes, "tiny")


def make_weights(spec: ModelSpec, rank: int, modules=ATTN, seed: int = 0, dtype=torch.float32, layers=None,
                 std: float = 0.3) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers if layers is not None else range(spec.num_layers):
        for m in modules:
            fan_in, fan_out = spec.module_shapes[m]
            out[(layer, m)] = ((torch.randn(fan_in, rank, generator=g) * std).to(dtype),
                               (torch.randn(rank, fan_out, generator=g) * std).to(dtype))
    return AdapterWeights.from_modules(f"w{seed}", out)


def filled_slots(spec: ModelSpec, dtype: torch.dtype, device: str = "cpu", num_slots: int = 6,
                 max_rank: int = 64) -> LoraSlots:
    """SLOT_TABLE loaded into a LoraSlots (slot 5 stays empty)."""
    slots = LoraSlots(spec, num_slots, max_rank, device, dtype)
    for slot, (rank, modules) in SLOT_TABLE.items():
        slots.load(slot, make_weights(spec, rank, modules, seed=slot, dtype=dtype))
    return slots


def reference_lora(x: Tensor, slots: LoraSlots, layer: int, module: str, seg_lens: list[int],
                   seg_slots: list[int]) -> Tensor:
    """The oracle: the LoRA delta [T, out] in fp32 on the CPU by a plain loop over tokens,
    delta[t] = x[t] @ A[layer, slot(t)] @ B[layer, slot(t)] (zero for slot -1)."""
    fan_out = slots.spec.module_shapes[module][1]
    delta = torch.zeros(x.shape[0], fan_out, dtype=torch.float32)
    t = 0
    for n, slot in zip(seg_lens, seg_slots, strict=True):
        if slot >= 0 and module in slots.A:
            A = slots.A[module][layer, slot].float().cpu().T  # [in, R]
            B = slots.B[module][layer, slot].float().cpu().T  # [R, out]
            for i in range(t, t + n):
                delta[i] = x[i].float().cpu() @ A @ B
        t += n
    return delta

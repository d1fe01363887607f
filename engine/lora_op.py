"""The batched LoRA op: every row of a packed batch adds its own adapter's delta (or none).

Rows are packed in segments: segment i is `seg_lens[i]` consecutive tokens that use device slot
`seg_slots[i]` (-1: base model only). For every target projection the op computes, in place,

    for i, slot in enumerate(seg_slots):              # s_i = sum(seg_lens[:i])
        if slot >= 0:
            y[s_i:s_{i+1}] += x[s_i:s_{i+1}] @ A[layer, slot] @ B[layer, slot]
    # x [T, in], y [T, out], A[layer, slot] [in, R], B[layer, slot] [R, out]  (LoraSlots)

`LoraOp` is the seam: `TorchLoraOp` is SGMV-style torch code for CPU and CUDA; a Triton/CUDA
SGMV kernel (punica, S-LoRA) implements the same two methods and reads the same LoraSlots.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.lora_slots import LoraSlots

# Modules that read the same input in a Llama-family layer: their shrinks fuse into one matmul
# against concatenated A (q/k/v read the attention input, gate/up the MLP input).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",))
# Segments go through one padded bmm (weights gathered once per batch layout) unless padding them
# all to the longest would cost more than PAD_WASTE x their real tokens; the longest segments are
# then taken out, one by one, and run as two matmuls each on slot views.
PAD_WASTE = 2.0


@dataclass(eq=False)
class LoraBatch:
    """Per-step metadata, built once per step by `LoraOp.prepare` and read by every `apply`."""

    seg_lens: list[int]
    seg_slots: list[int]
    num_tokens: int
    groups: dict[str, tuple[str, ...]]  # module -> allocated modules sharing its input (fused shrink)
    long: list[tuple[int, int, int, int]]  # (start, end, slot, rank): segments run alone, two matmuls each
    # the padded-bmm ("short") segments:
    short_slots: tuple[int, ...] = ()  # slot of each, in packing order
    short_rank: int = 0  # max rank over their slots (0: none)
    short_shape: tuple[int, int] = (0, 0)  # (segments, padded length) of the short path's bmm
    rows: slice = field(default_factory=lambda: slice(0))  # their tokens, when consecutive in y
    # unequal lengths: [n * len] token index of each padded position (None: x[rows] is the bmm
    # input as is, e.g. decode), and the padded positions that are real tokens
    gather: Tensor | None = None
    valid: Tensor | None = None
    scatter: Tensor | None = None  # [tokens] y row of each real token when not consecutive
    weights: dict = field(default_factory=dict)  # (layer, group) -> (A_cat [n, in, g*r], [B [n, r, out]])
    _shrink: tuple | None = None  # (key of x, x, x @ A_cat [n, len, g*r]) of the last fused shrink

    @property
    def active(self) -> bool:
        return bool(self.long) or self.short_rank > 0


class LoraOp(ABC):
    """Applies per-segment LoRA deltas, in place, from the weights in a LoraSlots.

    Contract:
    - `prepare` is called once per step, before the forward, with the step's packing; it may
      build index tensors and reuse work from earlier steps while the packing and the slots'
      `versions` of the slots it uses are unchanged.
    - `apply` is called for each (layer, target module) with that projection's input and output;
      it adds the LoRA delta to `y` in place and must not change rows whose slot is -1. It must
      be safe to call for a module no loaded adapter targets (no-op). Modules that share an input
      (q/k/v, gate/up) may share work when called with the same `x`; the caller does not modify
      that `x` in place between those calls (under inference mode this cannot be detected).
    - Neither syncs with the host in the hot path (no `.item()`, no host-side data inspection).
    """

    def __init__(self, slots: LoraSlots) -> None:
        self.slots = slots

    @abstractmethod
    def prepare(self, seg_lens: list[int], seg_slots: list[int]) -> LoraBatch:
        """Segment i = seg_lens[i] consecutive tokens using slot seg_slots[i] (-1: no adapter)."""

    @abstractmethod
    def apply(self, y: Tensor, x: Tensor, layer: int, module: str, batch: LoraBatch) -> None:
        """y[s_i:s_{i+1}] += x[s_i:s_{i+1}] @ A[layer, slot_i] @ B[layer, slot_i]; x [T, in], y [T, out]."""


class TorchLoraOp(LoraOp):
    """SGMV in torch, two paths chosen per segment:

    - padded bmm (decode, and prefill of similar lengths): one `bmm` over all segments padded to
      the longest (see PAD_WASTE). The per-segment weights
      `A[l, slots, :, :r]` / `B[l, slots, :r]` (r = max rank over those slots) are gathered once
      per (layer, module group) and reused while the short segments' slots and their versions are
      unchanged, because the gather copy, not the arithmetic, dominates a decode step. Modules that
      read the same x (q/k/v, gate/up) share one shrink against concatenated A.
    - alone (a segment much longer than the rest, e.g. a prompt beside decode rows):
      `y[s:e] += (x[s:e] @ A[l, slot, :, :r]) @ B[l, slot, :r]` on slot views (no copy), r its rank.
    """

    def __init__(self, slots: LoraSlots) -> None:
        super().__init__(slots)
        self._weights_key: tuple | None = None
        self._weights: dict = {}

    def prepare(self, seg_lens: list[int], seg_slots: list[int]) -> LoraBatch:
        slots, device = self.slots, self.slots.device
        groups = {m: tuple(g for g in group if slots.has_module(g))
                  for group in SHARED_INPUT for m in group if slots.has_module(m)}
        segs = []  # (start, length, slot) of every segment with an adapter
        start = 0
        for n, slot in zip(seg_lens, seg_slots):
            if slot >= 0 and n > 0 and slots.ranks[slot] > 0:
                segs.append((start, n, slot))
            start += n
        by_len = sorted(segs, key=lambda seg: -seg[1])
        total = sum(n for _, n, _ in segs)
        cut = 0  # by_len[:cut] run alone; the rest are padded to by_len[cut]'s length
        while cut < len(by_len) and (len(by_len) - cut) * by_len[cut][1] > PAD_WASTE * total:
            total -= by_len[cut][1]
            cut += 1
        alone = {st for st, _, _ in by_len[:cut]}  # starts of non-empty segments are unique
        long = [(st, st + n, slot, slots.ranks[slot]) for st, n, slot in by_len[:cut]]
        short = [seg for seg in segs if seg[0] not in alone]
        batch = LoraBatch(list(seg_lens), list(seg_slots), start, groups, long)
        if not short:
            return batch
        short_slots = tuple(s for _, _, s in short)
        key = (short_slots, tuple(slots.versions[s] for s in short_slots), tuple(groups))
        if key != self._weights_key:  # new packing or a slot reloaded: gather lazily again
            self._weights_key, self._weights = key, {}
        batch.weights = self._weights
        batch.short_slots = short_slots
        batch.short_rank = max(slots.ranks[s] for s in short_slots)
        length = max(n for _, n, _ in short)
        batch.short_shape = (len(short), length)
        first, last = short[0], short[-1]
        contiguous = all(a[0] + a[1] == b[0] for a, b in zip(short, short[1:]))
        if contiguous:  # no long segment in between (rows are sorted by slot, base rows first)
            batch.rows = slice(first[0], last[0] + last[1])
        if contiguous and all(n == length for _, n, _ in short):
            return batch  # decode, or prompts of one length: x[rows] is the bmm input as is
        batch.gather = _index([st + min(j, n - 1) for st, n, _ in short for j in range(length)], device)
        batch.valid = _index([i * length + j for i, (_, n, _) in enumerate(short) for j in range(n)], device)
        if not contiguous:
            batch.scatter = _index([st + j for st, n, _ in short for j in range(n)], device)
        return batch

    def _gathered(self, layer: int, group: tuple[str, ...], batch: LoraBatch) -> tuple[Tensor, list[Tensor]]:
        """(A_cat [n, in, g*r], [B_m [n, r, out] for m in group]) for the short segments' slots."""
        got = batch.weights.get((layer, group))
        if got is None:
            idx = _index(list(batch.short_slots), self.slots.device)
            r = batch.short_rank
            # slice to r before gathering: only the bytes the batch reads are copied
            a = [self.slots.A[m][layer, :, :, :r].index_select(0, idx) for m in group]
            got = (a[0] if len(a) == 1 else torch.cat(a, dim=2),  # [n, in, g*r]
                   [self.slots.B[m][layer, :, :r, :].index_select(0, idx) for m in group])
            batch.weights[(layer, group)] = got
        return got

    def apply(self, y: Tensor, x: Tensor, layer: int, module: str, batch: LoraBatch) -> None:
        group = batch.groups.get(module)
        if group is None:
            return  # no loaded adapter targets this module
        slots = self.slots
        for s, e, slot, r in batch.long:
            delta = (x[s:e].to(slots.dtype) @ slots.A[module][layer, slot, :, :r]) @ slots.B[module][layer, slot, :r, :]
            y[s:e] += delta.to(y.dtype)  # [e-s, out]
        if batch.short_rank:
            self._apply_short(y, x, layer, module, group, batch)

    def _apply_short(self, y: Tensor, x: Tensor, layer: int, module: str, group: tuple[str, ...],
                     batch: LoraBatch) -> None:
        n, length = batch.short_shape
        r = batch.short_rank
        # The same x (storage, layout, and version outside inference mode, where in-place changes
        # are tracked) as the last shrink of this layer's group: reuse that shrink.
        x_key = (layer, group, x.data_ptr(), x.shape, x.stride(), 0 if x.is_inference() else x._version)
        if batch._shrink is not None and batch._shrink[0] == x_key:
            s = batch._shrink[2]
        else:
            a_cat, _ = self._gathered(layer, group, batch)
            xs = x[batch.rows] if batch.gather is None else x.index_select(0, batch.gather)  # [n*len, in]
            s = torch.bmm(xs.to(a_cat.dtype).reshape(n, length, -1), a_cat)  # [n, len, g*r]
            batch._shrink = (x_key, x, s)  # holding x keeps its storage (and data_ptr) ours
        j = group.index(module)
        b = self._gathered(layer, group, batch)[1][j]
        s_j = s[:, :, j * r:(j + 1) * r]  # [n, len, r]
        if batch.gather is None and y.dtype == b.dtype and y.is_contiguous():
            y[batch.rows].view(n, length, -1).baddbmm_(s_j, b)  # in place: no [T, out] temporary
            return
        out = torch.bmm(s_j, b).view(n * length, -1)  # [n*len, out]
        if batch.valid is not None:
            out = out.index_select(0, batch.valid)
        out = out.to(y.dtype)
        if batch.scatter is None:
            y[batch.rows] += out
        else:
            y.index_add_(0, batch.scatter, out)


def _index(values: list[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def reference_lora(x: Tensor, slots: LoraSlots, layer: int, module: str, seg_lens: list[int],
                   seg_slots: list[int]) -> Tensor:
    """The oracle: the LoRA delta [T, out] in fp32 by a plain loop over tokens,
    delta[t] = x[t] @ A[layer, slot(t)] @ B[layer, slot(t)] (zero for slot -1)."""
    fan_out = slots.spec.module_shapes[module][1]
    delta = torch.zeros(x.shape[0], fan_out, dtype=torch.float32)
    t = 0
    for n, slot in zip(seg_lens, seg_slots):
        if slot >= 0 and module in slots.A:
            A = slots.A[module][layer, slot].float().cpu()  # [in, R]
            B = slots.B[module][layer, slot].float().cpu()  # [R, out]
            for i in range(t, t + n):
                delta[i] = x[i].float().cpu() @ A @ B
        t += n
    return delta


def build_lora_op(backend: str, slots: LoraSlots) -> LoraOp:
    """The LoRA op for `EngineConfig.lora_backend`."""
    if backend == "torch":
        return TorchLoraOp(slots)
    raise ValueError(f"unknown lora_backend {backend!r} (available: torch)")

"""The batched LoRA op: every row of a packed batch adds its own adapter's delta (or none).

`LoraOp` is the seam between the model runner and a backend; every backend reads the same
LoraSlots in place. `TorchLoraOp` (here) runs on CPU and CUDA; `TritonLoraOp`
(engine/lora_triton.py) is a pair of SGMV kernels for CUDA. `build_lora_op` picks one.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from engine.config import LORA_BACKENDS
from engine.lora_slots import LoraSlots

# Modules that read the same input in a Llama-family layer: their shrinks can share one pass over x
# (q/k/v read the attention input, gate/up the MLP input).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",))
# TorchLoraOp: segments go through one padded bmm (weights gathered once per batch layout) unless
# padding them all to the longest would cost more than PAD_WASTE x their real tokens; the longest
# segments are then taken out, one by one, and run as two matmuls each on slot views.
PAD_WASTE = 2.0


class Segment(NamedTuple):
    """Consecutive token rows that use one adapter."""

    start: int  # first row in the packed batch
    length: int  # rows (> 0)
    slot: int  # device slot (>= 0)
    rank: int  # the rank of that slot's adapter (> 0)


@dataclass(frozen=True, eq=False)
class LoraBatch:
    """One step's packing as every backend reads it, built once per step by `LoraOp.prepare`."""

    seg_lens: tuple[int, ...]  # as packed by the runner: seg_lens[i] rows use slot seg_slots[i]
    seg_slots: tuple[int, ...]  # (-1: base model only)
    num_tokens: int
    segments: tuple[Segment, ...]  # the non-empty segments whose slot holds an adapter, in packing order
    groups: Mapping[str, tuple[str, ...]]  # module -> allocated modules reading the same input, in order
    plan: Any = None  # the backend's own per-step data (index tensors, caches): made by its `plan`

    @property
    def active(self) -> bool:
        return bool(self.segments)

    @property
    def max_rank(self) -> int:
        return max((seg.rank for seg in self.segments), default=0)


class LoraOp(ABC):
    """Adds each segment's LoRA delta to a projection's output, in place, reading a LoraSlots.

    For one (layer, module), with x [T, in] and y [T, out] the projection's input and output, and
    A = slots.A[module][layer] [S, R, in], B = slots.B[module][layer] [S, out, R] (PEFT's layout;
    R the slots' max rank, zero-padded; the adapter's scale is folded into B):

        for start, length, slot, rank in batch.segments:      # rows of slot -1 are in no segment
            rows = slice(start, start + length)
            s = x[rows] @ A[slot, :rank].T                    # shrink  [length, in] @ [in, rank]
            y[rows] += s @ B[slot, :, :rank].T                # expand  [length, rank] @ [rank, out]

    Contract:
    - `prepare` is called once per step, before the forward, with the step's packing. It finds
      the segments and calls `plan`, where a backend builds its index tensors; a backend may reuse
      work of earlier steps while the packing and the `versions` of the slots it reads are unchanged.
    - `apply` is called for each (layer, target module) with that projection's input and output;
      it adds the delta to `y` in place and never changes rows of slot -1. It is a no-op for a
      module no loaded adapter targets. Modules that share an input (q/k/v, gate/up) may share
      the shrink when called with the same `x`; the caller does not change that `x` in place
      between those calls (under inference mode this cannot be detected).
    - Neither syncs with the host in the hot path (no `.item()`, no host-side data inspection).
    - `order` may be asked, before `prepare`, in which order the runner should pack row groups.
    """

    def __init__(self, slots: LoraSlots) -> None:
        self.slots = slots

    def order(self, slots: list[int]) -> list[int]:
        """The order in which to pack the row groups of `slots` (distinct device slots, >= 0).
        A backend that keeps per-row data between steps answers with its own order, so that a batch
        that gains or loses an adapter changes one row of that data, not every row after it.
        Default: ascending."""
        return sorted(slots)

    def prepare(self, seg_lens: list[int], seg_slots: list[int]) -> LoraBatch:
        """Segment i = seg_lens[i] consecutive tokens using slot seg_slots[i] (-1: no adapter)."""
        slots = self.slots
        groups = {m: tuple(g for g in group if slots.has_module(g))
                  for group in SHARED_INPUT for m in group if slots.has_module(m)}
        segments = []
        start = 0
        for n, slot in zip(seg_lens, seg_slots, strict=True):
            if slot >= 0 and n > 0 and slots.ranks[slot] > 0:
                segments.append(Segment(start, n, slot, slots.ranks[slot]))
            start += n
        batch = LoraBatch(tuple(seg_lens), tuple(seg_slots), start, tuple(segments), groups)
        return replace(batch, plan=self.plan(batch)) if segments else batch

    @abstractmethod
    def plan(self, batch: LoraBatch) -> Any:
        """This backend's per-step data for `batch` (which has at least one segment)."""

    @abstractmethod
    def apply(self, y: Tensor, x: Tensor, layer: int, module: str, batch: LoraBatch) -> None:
        """y[rows] += x[rows] @ A[layer, slot, :rank].T @ B[layer, slot, :, :rank].T for every segment;
        x [T, in], y [T, out]."""


@dataclass(eq=False)
class _TorchPlan:
    """TorchLoraOp's per-step data. "Short" segments share one padded bmm; "long" ones run alone."""

    long: list[Segment]
    weights: dict = field(default_factory=dict)  # (layer, group) -> (A_cat [n, in, g*r], [B [n, r, out] per module])
    short_slots: tuple[int, ...] = ()  # slot of each short segment, in packing order
    short_rank: int = 0  # max rank over their slots (0: no short segment)
    short_shape: tuple[int, int] = (0, 0)  # (segments, padded length) of the bmm
    rows: slice = field(default_factory=lambda: slice(0))  # their tokens, when consecutive in y
    # unequal lengths: [n * len] token index of each padded position (None: x[rows] is the bmm
    # input as is, e.g. decode), and the padded positions that are real tokens
    gather: Tensor | None = None
    valid: Tensor | None = None
    scatter: Tensor | None = None  # [tokens] y row of each real token when not consecutive
    shrink: tuple | None = None  # (key of x, x, x @ A_cat [n, len, g*r]) of the last shared shrink


class TorchLoraOp(LoraOp):
    """SGMV in torch, two paths chosen per segment:

    - padded bmm (decode, and prefill of similar lengths): one `bmm` over all segments padded to
      the longest (see PAD_WASTE), on per-segment weights `A[l, slot, :r].T` / `B[l, slot, :, :r].T`
      (r = max rank over those slots) copied into one bmm row per segment. The gather copy, not the
      arithmetic, dominates a decode step, so the rows are kept between steps: a row is copied
      again only when the slot packed at its position, or that slot's version, changes; `order`
      keeps each slot at its row, so an adapter that joins or leaves the batch costs one row.
      Modules that read the same x (q/k/v, gate/up) share one shrink against concatenated A.
    - alone (a segment much longer than the rest, e.g. a prompt beside decode rows):
      `y[s:e] += (x[s:e] @ A[l, slot, :r].T) @ B[l, slot, :, :r].T` on slot views (no copy), r its rank.
    """

    def __init__(self, slots: LoraSlots) -> None:
        super().__init__(slots)
        self._rows: list[tuple[int, int]] = []  # (slot, version) copied into each bmm row, by position
        self._layout: tuple | None = None  # (rank, module groups) the rows are cut for
        self._capacity = 0  # bmm rows allocated
        # (layer, group) -> (A_cat [capacity, in, g*r], [B^T [capacity, out, r]]): B is kept transposed, the
        # layout in which the batched expand reads it fastest on CPU (measured 1.4x over [capacity, r, out])
        self._gathered: dict = {}
        self._weights: dict = {}  # the same cut to the rows in use: [n, ...] views
        self._num_rows = 0  # n of those views

    def order(self, slots: list[int]) -> list[int]:
        """Each slot already copied to a bmm row below len(slots) keeps that row; the others fill
        the rows left, ascending (the last adapter moves up to fill a leaver's row: one row, not all)."""
        wanted = set(slots)
        placed: list[int | None] = [None] * len(slots)
        for i, (slot, _) in enumerate(self._rows[:len(slots)]):
            if slot in wanted:
                placed[i] = slot
                wanted.discard(slot)
        rest = iter(sorted(wanted))
        return [slot if slot is not None else next(rest) for slot in placed]

    def plan(self, batch: LoraBatch) -> _TorchPlan:
        device = self.slots.device
        by_len = sorted(batch.segments, key=lambda seg: -seg.length)
        total = sum(seg.length for seg in by_len)
        cut = 0  # by_len[:cut] run alone; the rest are padded to by_len[cut]'s length
        while cut < len(by_len) and (len(by_len) - cut) * by_len[cut].length > PAD_WASTE * total:
            total -= by_len[cut].length
            cut += 1
        plan = _TorchPlan(long=by_len[:cut])
        alone = {seg.start for seg in plan.long}  # starts of non-empty segments are unique
        short = [seg for seg in batch.segments if seg.start not in alone]
        if not short:
            return plan
        plan.short_slots = tuple(seg.slot for seg in short)
        plan.short_rank = max(seg.rank for seg in short)
        plan.weights = self._gather(plan.short_slots, plan.short_rank, batch.groups)
        length = max(seg.length for seg in short)
        plan.short_shape = (len(short), length)
        first, last = short[0], short[-1]
        contiguous = all(a.start + a.length == b.start for a, b in zip(short, short[1:], strict=False))
        if contiguous:  # no long segment in between (decode rows, then prompt chunks)
            plan.rows = slice(first.start, last.start + last.length)
        if contiguous and all(seg.length == length for seg in short):
            return plan  # decode, or prompts of one length: x[rows] is the bmm input as is
        plan.gather = _index([st + min(j, n - 1) for st, n, _, _ in short for j in range(length)], device)
        plan.valid = _index([i * length + j for i, seg in enumerate(short) for j in range(seg.length)], device)
        if not contiguous:
            plan.scatter = _index([st + j for st, n, _, _ in short for j in range(n)], device)
        return plan

    @torch.inference_mode()  # the rows are copied in place: into tensors only ever changed in inference mode
    def _gather(self, short_slots: tuple[int, ...], rank: int, groups: Mapping[str, tuple[str, ...]]) -> dict:
        """(layer, group) -> (A_cat [n, in, g*r], [B_m [n, r, out] for m in group]), bmm row i
        holding slot short_slots[i]'s A[layer, slot, :rank].T / B[layer, slot, :, :rank].T (the
        group's A side by side); only the rows whose slot, or that slot's version, changed are copied."""
        slots = self.slots
        rows = [(slot, slots.versions[slot]) for slot in short_slots]
        n = len(rows)
        layout = (rank, tuple(sorted(set(groups.values()))))
        if layout != self._layout or n > self._capacity:  # copy every row into new tensors
            self._layout, self._rows, self._num_rows = layout, [], 0
            self._capacity = 1 << (n - 1).bit_length()  # room to grow: a joining adapter moves no other
            self._gathered = {(layer, group): self._allocate(group, rank)
                              for layer in range(slots.spec.num_layers) for group in layout[1]}
        stale = [i for i, row in enumerate(rows) if i >= len(self._rows) or self._rows[i] != row]
        if stale:
            at = _index(stale, slots.device)
            idx = _index([short_slots[i] for i in stale], slots.device)
            for (layer, group), (a_cat, b) in self._gathered.items():
                for j, m in enumerate(group):  # sliced to the rank first: only the bytes the bmm reads are copied
                    a = slots.A[m][layer, :, :rank].index_select(0, idx)  # [stale, rank, in]
                    a_cat[:, :, j * rank:(j + 1) * rank].index_copy_(0, at, a.transpose(1, 2))
                    b[j].index_copy_(0, at, slots.B[m][layer, :, :, :rank].index_select(0, idx))
            self._rows = rows + self._rows[n:]
        if n != self._num_rows:
            self._weights = {key: (a[:n], [b_m[:n].transpose(1, 2) for b_m in b])  # B as [n, r, out] views
                             for key, (a, b) in self._gathered.items()}
            self._num_rows = n
        return self._weights

    def _allocate(self, group: tuple[str, ...], rank: int) -> tuple[Tensor, list[Tensor]]:
        """Uninitialised (A_cat [capacity, in, g*rank], [B_m^T [capacity, out, rank]]) for a module group."""
        shapes, device, dtype = self.slots.spec.module_shapes, self.slots.device, self.slots.dtype
        return (torch.empty(self._capacity, shapes[group[0]][0], len(group) * rank, device=device, dtype=dtype),
                [torch.empty(self._capacity, shapes[m][1], rank, device=device, dtype=dtype) for m in group])

    def apply(self, y: Tensor, x: Tensor, layer: int, module: str, batch: LoraBatch) -> None:
        group = batch.groups.get(module)
        plan: _TorchPlan | None = batch.plan
        if group is None or plan is None:
            return  # no loaded adapter targets this module, or no row has an adapter
        for s, n, slot, r in plan.long:
            a, b = self.slots.A[module][layer, slot, :r], self.slots.B[module][layer, slot, :, :r]
            y[s:s + n].add_(((x[s:s + n].to(a.dtype) @ a.T) @ b.T).to(y.dtype))  # [n, in] @ [in, r] @ [r, out]
        if plan.short_rank:
            self._apply_short(y, x, layer, module, group, plan)

    def _apply_short(self, y: Tensor, x: Tensor, layer: int, module: str, group: tuple[str, ...],
                     plan: _TorchPlan) -> None:
        n, length = plan.short_shape
        r = plan.short_rank
        # The same x (storage, layout, and version outside inference mode, where in-place changes
        # are tracked) as the last shrink of this layer's group: reuse that shrink.
        x_key = (layer, group, x.data_ptr(), x.shape, x.stride(), 0 if x.is_inference() else x._version)
        if plan.shrink is not None and plan.shrink[0] == x_key:
            s = plan.shrink[2]
        else:
            a_cat = plan.weights[(layer, group)][0]
            xs = x[plan.rows] if plan.gather is None else x.index_select(0, plan.gather)  # [n*len, in]
            s = torch.bmm(xs.to(a_cat.dtype).reshape(n, length, -1), a_cat)  # [n, len, g*r]
            plan.shrink = (x_key, x, s)  # holding x keeps its storage (and data_ptr) ours
        j = group.index(module)
        b = plan.weights[(layer, group)][1][j]
        s_j = s[:, :, j * r:(j + 1) * r]  # [n, len, r]
        if plan.gather is None and y.dtype == b.dtype and y.is_contiguous():
            y[plan.rows].view(n, length, -1).baddbmm_(s_j, b)  # in place: no [T, out] temporary
            return
        out = torch.bmm(s_j, b).view(n * length, -1)  # [n*len, out]
        if plan.valid is not None:
            out = out.index_select(0, plan.valid)
        out = out.to(y.dtype)
        if plan.scatter is None:
            y[plan.rows].add_(out)  # not `+=`: that would also copy the sum onto itself (setitem)
        else:
            y.index_add_(0, plan.scatter, out)


def _index(values: list[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def build_lora_op(backend: str, slots: LoraSlots) -> LoraOp:
    """The LoRA op for `EngineConfig.lora_backend`: "auto" is triton on CUDA when triton is
    installed, torch otherwise (and always on CPU)."""
    if backend == "auto":
        backend = "triton" if slots.device.type == "cuda" and triton_available() else "torch"
    if backend == "torch":
        return TorchLoraOp(slots)
    if backend == "triton":
        from engine.lora_triton import TritonLoraOp  # imports triton: only when chosen

        return TritonLoraOp(slots)
    raise ValueError(f"unknown lora_backend {backend!r} (one of {', '.join(LORA_BACKENDS)})")

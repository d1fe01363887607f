"""The device tier: every resident adapter's weights stacked in the layout the LoRA op reads.

Per target module, one zero-padded tensor holds all slots of all layers, in PEFT's own layout
(lora_A [r, in], lora_B [out, r]: what a file holds, so a load copies rows without transposing):
    A[module]: [num_layers, num_slots, max_rank, in]
    B[module]: [num_layers, num_slots, out, max_rank]   (scale folded in)
so `A[module][layer, slot, :r]` is a view the op multiplies with (`x @ A.T @ B.T`), never a copy.
Padding rows and columns are zero, so slicing to any r >= the slot's rank gives the same product.

Tensors are allocated lazily, the first time a loaded adapter targets a module: a deployment
whose adapters touch only q/v pays nothing for the MLP. Memory per allocated module is
`num_layers * num_slots * max_rank * (in + out) * itemsize` and is never given back.

A load writes one copy per `LayerRun` (a few per module: a 30-layer file in name order makes five;
B multiplied by the run's scale on the way) and zeroes only what the slot's previous adapter may
have left beyond it: per module and slot, `_extent` is the rank up to which values may be non-zero,
so a rank-8 adapter replacing a rank-8 adapter on the same layers zeroes nothing, and no load
clears the whole max_rank padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from engine.adapter import AdapterWeights, LayerRun

if TYPE_CHECKING:
    from engine.model_loader import ModelSpec


class LoraSlots:
    def __init__(self, spec: ModelSpec, num_slots: int, max_rank: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        self.spec = spec
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.dtype = dtype
        self.A: dict[str, Tensor] = {}
        self.B: dict[str, Tensor] = {}
        self.ranks: list[int] = [0] * num_slots  # per slot, 0 = empty
        # Bumped on every load/clear of a slot; the op keys cached gathers on them.
        self.versions: list[int] = [0] * num_slots
        self._clock = 0
        self._extent: dict[str, list[int]] = {}  # module -> per slot: columns of A / rows of B maybe non-zero

    def has_module(self, module: str) -> bool:
        """True once some loaded adapter targets `module` (the op can be skipped otherwise)."""
        return module in self.A

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.A.values(), *self.B.values()))

    def _allocate(self, module: str) -> None:
        fan_in, fan_out = self.spec.module_shapes[module]
        shape = (self.spec.num_layers, self.num_slots)
        self.A[module] = torch.zeros(*shape, self.max_rank, fan_in, device=self.device, dtype=self.dtype)
        self.B[module] = torch.zeros(*shape, fan_out, self.max_rank, device=self.device, dtype=self.dtype)
        self._extent[module] = [0] * self.num_slots

    def _bump(self, slot: int) -> None:
        self._clock += 1
        self.versions[slot] = self._clock

    def load(self, slot: int, w: AdapterWeights) -> None:
        """Copy adapter `w` into `slot`; every allocated module and layer it does not target reads zero.
        On CUDA the copies are asynchronous when `w` is in pinned memory; ops issued later on the
        same stream see the data, and the caching host allocator keeps the pinned source alive."""
        if w.rank > self.max_rank:
            raise ValueError(f"adapter rank {w.rank} exceeds slot max_rank {self.max_rank}")
        for run in w.runs:
            if run.module not in self.A:
                self._allocate(run.module)
        non_blocking = self.device.type == "cuda"
        for module, extents in self._extent.items():
            A, B = self.A[module][:, slot], self.B[module][:, slot]  # [L, R, in], [L, out, R]
            runs = [run for run in w.runs if run.module == module]
            stale = extents[slot]
            if stale > _covered(runs, self.spec.num_layers):  # the old adapter's values would show
                A[:, :stale].zero_()
                B[:, :, :stale].zero_()
            for run in runs:
                A[run.layers, :run.rank].copy_(run.A, non_blocking=non_blocking)
                b = B[run.layers, :, :run.rank]
                if run.scale == 1.0:
                    b.copy_(run.B, non_blocking=non_blocking)
                elif b.dtype == run.B.dtype and b.device == run.B.device:
                    torch.mul(run.B, run.scale, out=b)  # scaled on the way: no temporary
                else:  # scaled in B's own dtype (fp32 from a load), then cast / moved
                    b.copy_(run.B.to(self.device, non_blocking=non_blocking) * run.scale)
            extents[slot] = max((run.rank for run in runs), default=0)
        self.ranks[slot] = w.rank
        self._bump(slot)

    def free_module(self, module: str) -> None:
        """Give back `module`'s tensors (the next load targeting it allocates them again). Only
        while no slot holds an adapter targeting it: the warm-up's scratch adapter, cleared."""
        del self.A[module], self.B[module], self._extent[module]

    def clear(self, slot: int) -> None:
        """Mark `slot` empty. Its stale values stay until the next load overwrites every module."""
        self.ranks[slot] = 0
        self._bump(slot)


def _covered(runs: list[LayerRun], num_layers: int) -> int:
    """The rank up to which `runs` overwrite every layer (0 unless they cover all layers)."""
    if sum(run.A.shape[0] for run in runs) < num_layers:
        return 0
    return min(run.rank for run in runs)

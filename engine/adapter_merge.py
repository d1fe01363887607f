"""Per-request adapter merging (LoRAX's `merged_adapters`): several PEFT LoRA adapters combined into
one, built on a loader thread and cached in the tiers like any adapter (engine/adapter_store.py).

The math is LoRAX's (`server/lorax_server/utils/merges/strategies.py`, taken from PEFT's
`merge_utils`). Per target module, the adapters' `lora_A` [r, in] are merged into one A and,
separately, their `lora_B` [out, r] into one B, by the same strategy with the same weights w_i:

    linear:       A = sum_i w_i A_i                           (B likewise)
    ties:         T_i = keep the `density` fraction of largest |values| of A_i, zero the rest
                  sign = sign(sum_i T_i) (total) or sign(sum_i sign(T_i)) (frequency), + on 0
                  A = sum_i w_i T_i [sign(T_i) = sign] / max(1, #{i: sign(T_i) = sign})  (elementwise)
    dare_linear:  T_i = A_i * Bernoulli(density) / density, then linear over the T_i
    dare_ties:    the dare T_i, then ties' sign election and disjoint mean

So the merged delta is `scale * B @ A`, not `sum_i w_i scale_i B_i @ A_i`: the weights apply to A and
to B each (cross terms B_i A_j included). `scale` is the first adapter's (LoRAX merges the configs by
copying the first): its scale for that module, or its config's alpha / r where it does not target
the module. A module some adapters do not target merges the others only (an absent adapter would
add zeros, which never join the ties count). Merging needs equal ranks per module; targets may
differ (the union is merged, as in LoRAX and PEFT).

Differences from LoRAX, on purpose: DARE divides the kept values by `density` (LoRAX calls
`torch.div` and drops its result, so it never rescales; PEFT and the DARE paper rescale), and its
random masks come from a generator seeded with the definition's digest (`MergedAdapters.digest`,
as an int), drawn module by module in (layer, LORA_MODULES) order, each module's A tensors in `ids`
order then its B tensors, so rebuilding an evicted merge gives the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from engine.adapter import AdapterWeights, LoraTensors, lay_out, read_peft_lora
from engine.config import LORA_MODULES
from engine.request import EngineError, ErrorType, MergedAdapters

if TYPE_CHECKING:
    from engine.model_loader import ModelSpec


def dare_seed(merge: MergedAdapters) -> int:
    """The seed of DARE's random masks: the definition's digest as a 64-bit int."""
    return int(merge.digest, 16)


def _magnitude_prune(t: Tensor, density: float) -> Tensor:
    """Keep the int(density * numel) largest |values| of `t`, zero the rest."""
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * mask.reshape(t.shape)


def _random_prune(t: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each value with probability `density`, rescaled by 1 / density."""
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def merge_tensors(tensors: list[Tensor], weights: Tensor, merge: MergedAdapters,
                  generator: torch.Generator) -> Tensor:
    """One tensor from n task tensors of one shape S by `merge.merge_strategy` (module docstring):
    `tensors` n x [*S], `weights` [n] -> [*S]. `generator` draws DARE's masks."""
    strategy, density = merge.merge_strategy, merge.density
    if density < 1.0 and strategy == "ties":
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif density < 1.0 and strategy.startswith("dare"):
        tensors = [_random_prune(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)  # [n, *S]
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if strategy in ("linear", "dare_linear"):
        return weighted.sum(0)
    sign = stacked.sign()
    votes = stacked.sum(0) if merge.majority_sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0)  # [n, *S]
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_lora(adapters: list[LoraTensors], merge: MergedAdapters) -> LoraTensors:
    """The merged adapter of `adapters` (in `merge.ids` order). Raises EngineError(validation) naming
    `parameters.merged_adapters` when two adapters target one module with different ranks."""
    generator = torch.Generator().manual_seed(dare_seed(merge))
    first = adapters[0]
    keys = sorted({k for a in adapters for k in a.modules}, key=lambda k: (k[0], LORA_MODULES.index(k[1])))
    modules: dict[tuple[int, str], tuple[Tensor, Tensor, float]] = {}
    for key in keys:
        present = [i for i, a in enumerate(adapters) if key in a.modules]
        ranks = {merge.ids[i]: adapters[i].modules[key][0].shape[0] for i in present}
        if len(set(ranks.values())) > 1:
            raise EngineError(ErrorType.VALIDATION, f"parameters.merged_adapters: cannot merge adapters of "
                              f"different ranks on layer {key[0]} {key[1]} ({ranks}): every strategy "
                              f"merges A and B elementwise, so ranks must be equal")
        weights = torch.tensor([merge.weights[i] for i in present], dtype=torch.float32)
        a = merge_tensors([adapters[i].modules[key][0] for i in present], weights, merge, generator)
        b = merge_tensors([adapters[i].modules[key][1] for i in present], weights, merge, generator)
        scale = first.modules[key][2] if key in first.modules else first.scale
        modules[key] = (a, b, scale)
    return LoraTensors(modules, first.scale)


def load_merged_adapter(merge: MergedAdapters, fetch: Callable[[str], Path], spec: ModelSpec,
                        dtype: torch.dtype, max_rank: int, allow_pickle: bool, key: str) -> AdapterWeights:
    """Fetch (a local directory per id), read and validate every adapter of `merge`, merge them and
    lay the result out for the op. A constituent's EngineError keeps its type and names its id."""
    adapters = []
    for i, adapter_id in enumerate(merge.ids):
        try:
            adapters.append(read_peft_lora(fetch(adapter_id), spec, max_rank, allow_pickle))
        except EngineError as e:
            raise EngineError(e.type, f"parameters.merged_adapters.ids[{i}] {adapter_id!r}: {e.message}",
                              e.retryable) from None
    return lay_out(merge_lora(adapters, merge), dtype, key)

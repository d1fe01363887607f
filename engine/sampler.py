"""Per-row next-token choice: greedy, temperature, top-k, top-p, typical-p, repetition, frequency
and presence penalties, seed, and each row's logprobs and most likely alternatives.

Semantics follow transformers' logits processors exactly, in LoRAX's order: repetition penalty,
frequency and presence penalties (LoRAX's own processor), then (sampling only) temperature, top-k,
top-p, typical-p, then a draw from the softmax.

Reproducibility: every sampled row draws from its own `torch.Generator`, and every op on a sampled
row runs on that row alone, so a seed gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from engine.request import SamplingParams


@dataclass
class SamplingState:
    """One per sequence: its params and, when sampling, its own seeded random stream."""

    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    seed: int | None  # the seed used (params.seed, or a fresh one reported in the reply)

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device | str = "cpu") -> SamplingState:
        """The generator lives on the logits' device (multinomial on CUDA needs a CUDA generator),
        so one seed gives one stream per device type, not the same tokens on CPU and CUDA."""
        if params.greedy:
            return cls(params, None, params.seed)
        seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
        return cls(params, torch.Generator(device=device).manual_seed(seed), seed)


class Sampled(NamedTuple):
    """One step's choice, per row (`Sampler.sample`)."""

    token_ids: list[int]
    logprobs: list[float | None]  # rows with params.logprobs: the chosen token's
    alternatives: list[list[tuple[int, float]] | None]  # rows with return_k_alternatives: (id, logprob)


class Sampler:
    def sample(
        self, logits: Tensor, states: Sequence[SamplingState], token_histories: Sequence[Sequence[int]],
        bias: Tensor | None = None,
    ) -> Sampled:
        """Choose one token per row.

        logits: [B, V] fp32, the last position of each row; not modified.
        token_histories: per row, prompt + output ids so far (read only for the penalties).
        bias: [B, V] fp32, the grammar's token mask (engine/grammar.py): 0 for a token the row may
        choose (every token of a free row), -inf for the others; added after the penalties, where
        LoRAX applies its schema.
        Returns the token ids and, for rows with params.logprobs, the chosen token's logprob:
        log_softmax of the logits after the penalties and temperature, before top-k/top-p/
        typical-p filtering (as vLLM reports it), so it measures the model, not the filter; for
        rows with params.return_k_alternatives, that many (id, logprob) of the same distribution,
        most likely first (ties: lower id first).
        """
        logits = logits.to(torch.float32, copy=True)  # [B, V]
        for i, (state, history) in enumerate(zip(states, token_histories, strict=True)):
            penalty = state.params.repetition_penalty
            if penalty is not None and penalty != 1.0 and history:
                apply_repetition_penalty(logits[i], history, penalty)
            p = state.params
            if (p.frequency_penalty or p.presence_penalty) and history:
                apply_frequency_penalties(logits[i], history, p.frequency_penalty, p.presence_penalty)
        if bias is not None:
            logits += bias
        temperatures = [1.0 if s.params.greedy else s.params.temperature for s in states]
        if any(t != 1.0 for t in temperatures):  # greedy rows ignore temperature, as in transformers
            logits /= torch.tensor(temperatures, device=logits.device)[:, None]

        # [B]; the answer for greedy rows, ties -> lowest id (as argmax: torch.max over a dim returns the
        # first maximal index; on CPU it took 0.4 ms for [32, 49152] fp32 against argmax's 3.1)
        token_ids = logits.max(dim=-1).indices
        # Row by row: each draws from its own generator (top_p / typical_p sort the vocabulary:
        # the dearest part, still small beside the forward).
        for i, state in enumerate(states):
            if state.generator is not None:
                probs = warp(logits[i], state.params).softmax(dim=-1)  # [V]
                token_ids[i] = torch.multinomial(probs, 1, generator=state.generator)[0]

        logprobs: list[float | None] = [None] * len(states)
        alternatives: list[list[tuple[int, float]] | None] = [None] * len(states)
        wanted = [i for i, s in enumerate(states) if s.params.logprobs or s.params.return_k_alternatives]
        if wanted:
            rows = torch.tensor(wanted, device=logits.device)
            logp = torch.log_softmax(logits[rows], dim=-1)  # [W, V]
            chosen = logp.gather(1, token_ids[rows, None])[:, 0].tolist()  # [W]
            for w, i in enumerate(wanted):
                params = states[i].params
                if params.logprobs:
                    logprobs[i] = chosen[w]
                if params.return_k_alternatives:
                    values, ids = torch.sort(logp[w], descending=True, stable=True)  # [V]
                    k = min(params.return_k_alternatives, logp.shape[1])
                    alternatives[i] = [(t, v) for t, v in zip(ids[:k].tolist(), values[:k].tolist(), strict=True)
                                       if v != float("-inf")]  # tokens the grammar masked are no alternatives
        return Sampled(token_ids.tolist(), logprobs, alternatives)


def apply_repetition_penalty(row: Tensor, history: Sequence[int], penalty: float) -> None:
    """In place on row [V]: for every id seen, logit < 0 -> logit * penalty, else logit / penalty
    (CTRL / transformers' RepetitionPenaltyLogitsProcessor; each id once however often it occurs).
    Ids >= V (embedding rows beyond the lm_head) are ignored, as in transformers."""
    ids = torch.tensor(sorted({t for t in history if t < row.shape[0]}), dtype=torch.long, device=row.device)
    seen = row[ids]
    row[ids] = torch.where(seen < 0, seen * penalty, seen / penalty)


def apply_frequency_penalties(row: Tensor, history: Sequence[int], frequency: float, presence: float) -> None:
    """In place on row [V], LoRAX's HeterogeneousFrequencyPenaltyLogitsProcessor for one row: with
    c[j] the count of id j in the history (prompt + output) and n its length,
        row[j] -= frequency * c[j] / n + presence * (c[j] > 0)
    (LoRAX divides by its padded batch width; by the row's own length here, so a row's result does
    not depend on the batch). Ids >= V are ignored, as for the repetition penalty."""
    ids = torch.tensor([t for t in history if t < row.shape[0]], dtype=torch.long, device=row.device)
    counts = torch.bincount(ids, minlength=row.shape[0]).to(row.dtype)  # [V]
    row -= frequency * counts / len(history) + presence * (counts > 0).to(row.dtype)


def warp(row: Tensor, params: SamplingParams) -> Tensor:
    """Filter one temperature-scaled row [V] (-inf = removed), each step only when it is active."""
    if params.top_k is not None and params.top_k < row.shape[0]:
        row = top_k(row, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        row = top_p(row, params.top_p)
    if params.typical_p is not None and params.typical_p < 1.0:
        row = typical_p(row, params.typical_p)
    return row


def top_k(row: Tensor, k: int) -> Tensor:
    """Keep logits >= the k-th largest (ties at the boundary are all kept)."""
    kth = torch.topk(row, k).values[-1]
    return row.masked_fill(row < kth, float("-inf"))


def top_p(row: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= p: ascending sort,
    remove the prefix whose cumulative mass is <= 1 - p; the most likely token always stays."""
    sorted_logits, order = torch.sort(row, descending=False)  # [V]
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= 1 - p
    remove[-1] = False
    return row.masked_fill(remove.scatter(0, order, remove), float("-inf"))


def typical_p(row: Tensor, mass: float) -> Tensor:
    """Locally typical sampling: rank tokens by |-log p - H| (distance of their surprise from the
    entropy H) and keep the closest ones until their probability mass reaches `mass`."""
    logp = torch.log_softmax(row, dim=-1)  # [V]
    entropy = -(logp * logp.exp()).nansum()
    distance, order = torch.sort((-logp - entropy).abs(), descending=False)
    cum = row[order].softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass).sum().clamp(max=row.shape[0] - 1)
    remove = distance > distance[last]
    remove[0] = False
    return row.masked_fill(remove.scatter(0, order, remove), float("-inf"))

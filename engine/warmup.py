"""Start-up warm-up: a few throwaway steps before the first job, so that job does not pay the
process's one-time costs (OpenMP thread pools and allocator growth on CPU; cuBLAS handles, kernel
selection and Triton compiles on CUDA; the tokenizer's chat template, the sampler's paths).

Two rounds, each a prefill and DECODE_STEPS decode steps of two rows (one greedy, one sampled with
top-k / top-p / repetition penalty / logprobs): the base model alone, then the base model beside
a row with a synthetic LoRA adapter (random, rank WARMUP_RANK) written into an empty device slot.

It runs on the step thread between steps (`Engine.warmup`) and uses only what no request holds:
KV blocks from the free list and an empty slot. It gives them back, frees the adapter tensors it
made the slots allocate, and bypasses the scheduler and every counter, so the engine's stats and
the outputs of later requests are what they would be without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import structlog
import torch

from engine.adapter import AdapterWeights
from engine.config import LORA_MODULES
from engine.detokenizer import Detokenizer
from engine.request import EngineError, GenerationRequest, SamplingParams
from engine.sampler import Sampler, SamplingState
from engine.sequence import Sequence

if TYPE_CHECKING:
    from engine.kv_cache import BlockManager
    from engine.lora_slots import LoraSlots
    from engine.model_runner import ModelRunner

log = structlog.get_logger(__name__)

PROMPT = "Warm-up: name three colours of the rainbow."
DECODE_STEPS = 3
WARMUP_RANK = 8
# The adapter's targets: the modules the slots already hold, else PEFT's default ones. Allocating
# all seven for every slot could take more memory than the deployment's adapters ever need.
DEFAULT_MODULES = ("q_proj", "v_proj")
ROW_PARAMS = (
    SamplingParams(max_new_tokens=DECODE_STEPS + 1),
    SamplingParams(max_new_tokens=DECODE_STEPS + 1, do_sample=True, temperature=0.7, top_k=50, top_p=0.9,
                   repetition_penalty=1.1, seed=0, logprobs=True),
)


def warm_up(runner: ModelRunner, sampler: Sampler, blocks: BlockManager, slots: LoraSlots, slot: int | None,
            tokenizer, tokenize: Callable[[GenerationRequest], list[int]], max_model_len: int) -> None:
    """Run the rounds (the adapter one only when `slot`, an empty device slot, is given); logs
    each round. Skips, with a warning, what the free KV blocks cannot hold."""
    prompt_ids = _prompt_ids(tokenize)[:max(1, max_model_len - DECODE_STEPS - 1)]
    need = len(ROW_PARAMS) * blocks.blocks_for(len(prompt_ids) + DECODE_STEPS + 1)
    if need > blocks.num_free:
        log.warning("engine_warmup_skipped", reason="KV blocks in use", need_blocks=need, free_blocks=blocks.num_free)
        return
    t0 = time.perf_counter()
    _round(runner, sampler, blocks, tokenizer, prompt_ids, (-1, -1))
    log.info("engine_warmup_round", adapter=False, prompt_tokens=len(prompt_ids), decode_steps=DECODE_STEPS,
             ms=round((time.perf_counter() - t0) * 1e3, 1))
    if slot is None:
        log.warning("engine_warmup_skipped", reason="no empty adapter slot", round="adapter")
        return
    t0 = time.perf_counter()
    with _scratch_adapter(slots, slot) as modules:
        _round(runner, sampler, blocks, tokenizer, prompt_ids, (-1, slot))
    log.info("engine_warmup_round", adapter=True, modules=modules, rank=min(WARMUP_RANK, slots.max_rank),
             ms=round((time.perf_counter() - t0) * 1e3, 1))


def _prompt_ids(tokenize: Callable[[GenerationRequest], list[int]]) -> list[int]:
    """The prompt through the engine's own tokenization: the chat template when the model has
    one (compiled on first use), else plain text."""
    try:
        return tokenize(GenerationRequest(id="warmup", messages=[{"role": "user", "content": PROMPT}]))
    except EngineError:
        return tokenize(GenerationRequest(id="warmup", prompt=PROMPT))


def _round(runner: ModelRunner, sampler: Sampler, blocks: BlockManager, tokenizer, prompt_ids: list[int],
           row_slots: tuple[int, ...]) -> None:
    """One prefill and DECODE_STEPS decode steps of one row per slot in `row_slots` (-1: base)."""
    rows, states, detokenizers = [], [], []
    for i, (params, slot) in enumerate(zip(ROW_PARAMS, row_slots, strict=True)):
        request = GenerationRequest(id=f"warmup-{i}", prompt_token_ids=list(prompt_ids), params=params)
        rows.append(Sequence(request=request, token_ids=list(prompt_ids), num_prompt_tokens=len(prompt_ids),
                             adapter_slot=slot))
        states.append(SamplingState.create(params, runner.device))
        detokenizers.append(Detokenizer(tokenizer, prompt_ids, ()))
    try:
        for seq in rows:
            blocks.allocate(seq)
        for _ in range(DECODE_STEPS + 1):
            logits = runner.run(rows)  # [rows, V]: the prompts, then one token each
            token_ids = sampler.sample(logits, states, [seq.token_ids for seq in rows])[0]
            for seq, detokenizer, token_id in zip(rows, detokenizers, token_ids, strict=True):
                seq.token_ids.append(token_id)
                detokenizer.add(token_id)
                blocks.append(seq)  # room for its K/V in the next decode step
    finally:
        for seq in rows:
            blocks.deallocate(seq)


@contextmanager
def _scratch_adapter(slots: LoraSlots, slot: int) -> Iterator[tuple[str, ...]]:
    """A random adapter in `slot` (its own generator: the global random state is untouched);
    afterwards the slot is cleared and the module tensors its load allocated are freed."""
    modules = tuple(m for m in LORA_MODULES if slots.has_module(m)) or DEFAULT_MODULES
    allocated = tuple(m for m in modules if not slots.has_module(m))
    rank = min(WARMUP_RANK, slots.max_rank)
    g = torch.Generator().manual_seed(0)
    weights = {}
    for layer in range(slots.spec.num_layers):
        for m in modules:
            fan_in, fan_out = slots.spec.module_shapes[m]
            weights[(layer, m)] = (torch.randn(fan_in, rank, generator=g).to(slots.dtype) * 0.01,
                                   torch.randn(rank, fan_out, generator=g).to(slots.dtype) * 0.01)
    try:
        slots.load(slot, AdapterWeights.from_modules("warmup", weights))
        yield modules
    finally:
        slots.clear(slot)
        for m in allocated:
            if slots.has_module(m):
                slots.free_module(m)

"""Steps that mix decode rows with prompt chunks (engine/scheduler.py, engine/model_runner.py), exact
against transformers and PEFT whatever the mix: a prompt chunk in the step of decode rows on other
adapters, prompts split over several steps, sliding-window Mistral, preemption with the KV budget
exhausted, seeded sampling, and prompt logprobs scored chunk by chunk."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.config import EngineConfig
from engine.kv_cache import BlockManager, KVCache
from engine.model_runner import ModelRunner
from engine.request import AdapterRef, Completion, GenerationRequest, SamplingParams
from engine.sequence import Sequence
from tests.builders import peft_logits, peft_per_arch, run_requests

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # name -> make_adapter kwargs
    "qv_r8": dict(r=8, alpha=16, targets=("q_proj", "v_proj")),
    "all_r4": dict(r=4, alpha=8, targets=ALL),
    "attn_r16_rslora": dict(r=16, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora=True),
}
NAMES = list(ADAPTERS)


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n,), generator=g).tolist()


def result(outcome) -> Completion:
    assert isinstance(outcome, Completion), outcome
    return outcome


@pytest.fixture(scope="module")
def peft_models(tiny_model_dirs, tmp_path_factory):
    """arch -> (adapter root, PeftModel with every adapter of ADAPTERS loaded, on its own base copy)."""
    return peft_per_arch(tiny_model_dirs, tmp_path_factory, ADAPTERS, seed=50, prefix="mixed")


def reference_greedy(peft, adapter: str | None, ids: list[int], new: int) -> list[int]:
    """Greedy tokens by a full forward per token (no KV cache, no sliding-window cache logic)."""
    ids = list(ids)
    for _ in range(new):
        ids.append(int(peft_logits(peft, adapter, ids)[-1].argmax()))
    return ids[-new:]


def reference_logprobs(peft, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1]: log p(ids[p] | ids[:p]) for p >= 1."""
    logp = torch.log_softmax(peft_logits(peft, adapter, ids), dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def record_steps(engine) -> list[tuple[list[int], int]]:
    """Spy on the engine's forwards: per step, the tokens each row ran and how many rows got logits."""
    steps: list[tuple[list[int], int]] = []
    run, run_scored = engine.runner.run, engine.runner.run_scored

    def spy(seqs, num_new):
        logits = run(seqs, num_new)
        steps.append((list(num_new), logits.shape[0]))
        return logits

    def spy_scored(seqs, num_new, scored):
        logits, scores = run_scored(seqs, num_new, scored)
        steps.append((list(num_new), logits.shape[0]))
        return logits, scores

    engine.runner.run, engine.runner.run_scored = spy, spy_scored
    return steps


# ---- the runner: logits of every row that reaches its end, step by step ---------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral_sliding", "qwen2"])
def test_prompt_chunks_beside_decode_rows_match_peft(arch, loaded_models, peft_models):
    """Two rows decode while three prompts (two adapters, one base) join them, each split into
    chunks of 5 over several steps (23 = 5+5+5+5+3 crosses the sliding window of 8; 11 ends with a
    1-token chunk); a row's logits are checked whenever its step reaches its end, then it decodes."""
    from engine.adapter import load_peft_adapter
    from engine.lora_op import build_lora_op
    from engine.lora_slots import LoraSlots

    root, peft = peft_models(arch)
    model = loaded_models(arch)
    slots = LoraSlots(model.spec, len(NAMES), 16, model.device, model.dtype)
    for slot, name in enumerate(NAMES):
        slots.load(slot, load_peft_adapter(root / name, model.spec, model.dtype, 16, False))
    cfg = model.hf_model.config
    cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                    4, 1 << 20, model.device, model.dtype)
    blocks = BlockManager(cache.num_blocks, 4)
    runner = ModelRunner(model, cache, build_lora_op("torch", slots))
    adapter_of: dict[str, str | None] = {}

    def new_seq(adapter: str | None, n: int, seed: int) -> Sequence:
        ids = prompt_ids(n, seed)
        seq = Sequence(GenerationRequest(id=f"{adapter}-{n}", prompt_token_ids=ids), list(ids), n)
        seq.adapter_slot = NAMES.index(adapter) if adapter else -1
        adapter_of[seq.request_id] = adapter
        blocks.allocate(seq)
        return seq

    decoding = [new_seq(NAMES[0], 6, 1), new_seq(None, 9, 2)]
    joining = [new_seq(NAMES[1], 23, 3), new_seq(None, 11, 4), new_seq(NAMES[2], 13, 5)]
    checked = {s.request_id: 0 for s in decoding + joining}
    rows, num_new = decoding, None  # the first step: their whole prompts
    for _ in range(9):
        reach_end = [s for s, n in zip(rows, num_new or [s.num_tokens for s in rows], strict=True)
                     if s.num_computed_tokens + n == s.num_tokens]
        logits = runner.run(rows, num_new)
        assert logits.shape[0] == len(reach_end)
        for seq, row in zip(reach_end, logits, strict=True):
            expected = peft_logits(peft, adapter_of[seq.request_id], seq.token_ids)[-1]
            torch.testing.assert_close(row, expected, atol=1e-3, rtol=0)
            checked[seq.request_id] += 1
            seq.token_ids.append(int(row.argmax()))
            blocks.append(seq)
        decoding = [s for s in rows if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in joining if s.num_uncomputed_tokens > 1]
        rows = decoding + prefilling
        num_new = [1] * len(decoding) + [min(5, s.num_uncomputed_tokens) for s in prefilling]
    assert all(n >= 3 for n in checked.values()), checked  # every row decoded after its prompt


# ---- the engine: greedy tokens exact, whatever joins which step ------------------------------------

@pytest.mark.parametrize("pack_weights", [True, False])
@pytest.mark.parametrize("arch", ["llama", "mistral_sliding"])
def test_staggered_arrivals_split_and_mixed_match_peft(arch, pack_weights, make_engine, peft_models):
    """Requests arrive while others decode; with a 12-token budget their prompts are split and
    packed into the running rows' steps. Every row's greedy tokens equal PEFT's with its adapter,
    with the GEMMs on oneDNN-packed weights (the CPU default) and on the HF weights as they are."""
    root, peft = peft_models(arch)
    engine = make_engine(arch, adapter_root=str(root), adapter_slots=4, max_lora_rank=16, max_batch=8,
                         max_batched_tokens=12, pack_weights=pack_weights)
    steps = record_steps(engine)
    rows = [(NAMES[0], 7), (None, 4), (NAMES[1], 26), (NAMES[2], 15), (None, 19), (NAMES[0], 10)]
    requests = [GenerationRequest(id=f"r{i}", prompt_token_ids=prompt_ids(n, 60 + i), adapter=AdapterRef(a) if a
                                  else None, params=SamplingParams(max_new_tokens=8, ignore_eos=True))
                for i, (a, n) in enumerate(rows)]
    outcomes: dict = {}
    done = threading.Event()

    def finish(outcome) -> None:
        outcomes[outcome.request_id] = outcome
        if len(outcomes) == len(requests):
            done.set()

    def on_token(event) -> None:  # the later requests arrive one by one while the first two decode
        if event.request_id == "r0" and 1 <= event.index <= 4:
            engine.submit(requests[event.index + 1], None, finish)

    engine.submit(requests[0], on_token, finish)
    engine.submit(requests[1], None, finish)
    assert done.wait(120)
    for i, (adapter, _) in enumerate(rows):
        assert list(result(outcomes[f"r{i}"]).token_ids) == reference_greedy(
            peft, adapter, requests[i].prompt_token_ids, 8), f"r{i}"
    assert any(1 in num_new and max(num_new) > 1 for num_new, _ in steps), "a prompt chunk beside decode rows"
    assert any(sampled < len(num_new) for num_new, sampled in steps), "a prompt split over steps"
    assert all(sum(num_new) <= 12 for num_new, _ in steps)
    stats = engine.stats()
    assert stats["prefill_tokens"] == sum(n for _, n in rows) and stats["generated_tokens"] == 8 * len(rows)
    assert stats["kv_blocks_used"] == 0 and stats["adapters"]["device"]["pinned"] == 0


def test_preemption_with_split_prompts_stays_exact(make_engine, peft_models):
    """A KV budget too small for every row: rows are preempted (some in the middle of their
    prompt) and recomputed in chunks; greedy tokens and prompt logprobs stay exact."""
    root, peft = peft_models("llama")
    # tiny llama: one 4-token block = 2 (K, V) * 2 layers * 4 * 2 heads * 16 dims * 4 bytes = 2 KiB
    engine = make_engine("llama", adapter_root=str(root), kv_block_size=4, kv_cache_bytes=32 * 1024,
                         max_batch=6, max_batched_tokens=6)
    assert engine.kv_cache.num_blocks == 16
    steps = record_steps(engine)
    rows = [(None, 10), (NAMES[1], 12), (NAMES[2], 9), (None, 14), (NAMES[0], 11)]
    requests = [GenerationRequest(id=f"p{i}", prompt_token_ids=prompt_ids(n, 80 + i),
                                  adapter=AdapterRef(a) if a else None,
                                  params=SamplingParams(max_new_tokens=20, ignore_eos=True, prompt_logprobs=i % 2 == 1))
                for i, (a, n) in enumerate(rows)]
    outcomes = run_requests(engine, requests, timeout=180)
    for i, (adapter, _) in enumerate(rows):
        r = result(outcomes[f"p{i}"])
        ids = requests[i].prompt_token_ids
        assert list(r.token_ids) == reference_greedy(peft, adapter, ids, 20), f"p{i}"
        if i % 2:
            assert [t.token_id for t in r.prefill] == ids and r.prefill[0].logprob is None
            torch.testing.assert_close(torch.tensor([t.logprob for t in r.prefill[1:]]),
                                       reference_logprobs(peft, adapter, ids), atol=1e-4, rtol=0)
    stats = engine.stats()
    assert stats["preemptions"] > 0
    assert any(sampled < len(num_new) for num_new, sampled in steps)
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_free"] == 16


def test_prompt_logprobs_scored_chunk_by_chunk_match_peft(make_engine, peft_models):
    """decoder_input_details of prompts split over steps (one with an adapter, one base, one with a
    1-token prompt) while another row decodes: every prompt token's logprob as PEFT gives it."""
    root, peft = peft_models("llama")
    engine = make_engine("llama", adapter_root=str(root), max_batch=4, max_batched_tokens=7)
    steps = record_steps(engine)
    prompts = {"adapter": (NAMES[2], prompt_ids(31, 90)), "base": (None, prompt_ids(17, 91)),
               "one": (None, prompt_ids(1, 92)), "decoding": (NAMES[0], prompt_ids(5, 93))}
    out = run_requests(engine, [
        GenerationRequest(id=key, prompt_token_ids=ids, adapter=AdapterRef(a) if a else None,
                          params=SamplingParams(max_new_tokens=12 if key == "decoding" else 3, ignore_eos=True,
                                                prompt_logprobs=key != "decoding"))
        for key, (a, ids) in prompts.items()])
    assert result(out["decoding"]).prefill == ()
    assert [(t.token_id, t.logprob) for t in result(out["one"]).prefill] == [(prompts["one"][1][0], None)]
    for key in ("adapter", "base"):
        adapter, ids = prompts[key]
        prefill = result(out[key]).prefill
        assert [t.token_id for t in prefill] == ids and prefill[0].logprob is None
        torch.testing.assert_close(torch.tensor([t.logprob for t in prefill[1:]]),
                                   reference_logprobs(peft, adapter, ids), atol=1e-4, rtol=0)
        assert list(result(out[key]).token_ids) == reference_greedy(peft, adapter, ids, 3)
    assert any(sampled < len(num_new) for num_new, sampled in steps)


@pytest.mark.parametrize("do_sample", [False, True])
def test_seeded_sampling_is_unchanged_by_chunking_and_the_mix(make_engine, do_sample):
    params = SamplingParams(max_new_tokens=10, do_sample=do_sample, temperature=0.9, top_k=50, seed=1234)
    ids = prompt_ids(23, 7)
    alone = make_engine("llama")  # the whole prompt in one step, no other row
    whole = run_requests(alone, [GenerationRequest(id="x", prompt_token_ids=ids, params=params)])
    mixed = make_engine("llama", max_batch=4, max_batched_tokens=6)
    others = [GenerationRequest(id=f"o{i}", prompt_token_ids=prompt_ids(5 + 4 * i, i),
                                params=SamplingParams(max_new_tokens=4 + i, do_sample=True, seed=i))
              for i in range(4)]
    split = run_requests(mixed, [*others[:2], GenerationRequest(id="x", prompt_token_ids=ids, params=params),
                                 *others[2:]])
    assert result(whole["x"]).token_ids == result(split["x"]).token_ids
    assert result(split["x"]).seed == 1234


def test_token_budget_must_cover_a_decode_step():
    with pytest.raises(ValueError, match="max_batched_tokens"):
        EngineConfig(max_batch=16, max_batched_tokens=8)
    assert EngineConfig(max_batch=8, max_batched_tokens=8).max_batched_tokens == 8

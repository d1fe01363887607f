"""The engine end to end on tiny random Llama / Mistral / Qwen2 models: exact against transformers
(greedy tokens, logits) and against PEFT with many adapters in one batch; continuous batching
(join mid-flight, KV budget exhausted), and the request lifecycle (too long, cancel, deadline,
overload, a failing step, shutdown)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import BlockManager, KVCache
from engine.model_runner import ModelRunner
from engine.request import AdapterRef, Completion, ErrorType, GenerationFailure, GenerationRequest, SamplingParams
from engine.sequence import Sequence
from tests.builders import ARCHS, peft_logits, peft_per_arch, run_requests

PROMPT_LENGTHS = (3, 17, 40, 9, 26)


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n,), generator=g).tolist()


def greedy(new: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=new, **kw)


def hf_greedy(model, ids: list[int], new: int) -> list[int]:
    """transformers' own generate, one prompt at a time (no padding): the reference."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def result(outcome) -> Completion:
    assert isinstance(outcome, Completion), outcome
    return outcome


def failure(outcome, error_type: ErrorType) -> GenerationFailure:
    assert isinstance(outcome, GenerationFailure), outcome
    assert outcome.error.type is error_type, outcome.error.message
    return outcome


# ---- loading ---------------------------------------------------------------------------------

def test_import_engine_does_not_import_torch():
    code = ("import sys, engine, engine.request, engine.config; from engine import GenerationRequest, EngineConfig; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_loaded_model_spec(loaded_models):
    model = loaded_models("qwen2")
    assert model.spec.arch == "qwen2" and model.spec.num_layers == 2 and model.spec.hidden_size == 64
    assert model.spec.module_shapes == {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32),
                                        "o_proj": (64, 64), "gate_proj": (64, 128), "up_proj": (64, 128),
                                        "down_proj": (128, 64)}
    assert model.device.type == "cpu" and model.dtype is torch.float32
    assert model.eos_token_ids == frozenset({2}) and model.max_model_len == 512
    assert not model.hf_model.training


def test_engine_thread_builds_every_tensor(tiny_model_dirs, monkeypatch):
    """Model load and cache allocation run on the step thread, so the caller's thread never starts
    an OpenMP pool of its own (see README, "CPU threads")."""
    import engine.engine as engine_module

    built_on = {}
    for name in ("load_model", "KVCache", "LoraSlots"):
        real = getattr(engine_module, name)

        def record(*args, _real=real, _name=name, **kwargs):
            built_on[_name] = threading.current_thread().name
            return _real(*args, **kwargs)

        monkeypatch.setattr(engine_module, name, record)
    engine = Engine(EngineConfig(model=str(tiny_model_dirs["llama"])))
    try:
        assert built_on == dict.fromkeys(("load_model", "KVCache", "LoraSlots"), engine._thread.name)
        assert engine._thread.name != threading.current_thread().name
        run_requests(engine, [GenerationRequest(id="t", prompt="abc", params=greedy(2, ignore_eos=True))])
    finally:
        engine.shutdown(timeout=10)


def test_build_error_raised_to_the_caller(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        Engine(EngineConfig(model=str(tmp_path)))


def test_other_architectures_refused(tmp_path):
    from transformers import GPT2Config

    from engine.model_loader import load_model
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(EngineConfig(model=str(tmp_path)))


# ---- exactness against transformers -----------------------------------------------------------

@pytest.mark.parametrize("arch", [*ARCHS, "mistral_sliding"])
def test_logits_match_hf_forward(arch, loaded_models, hf_models):
    """Prefill of several sequences in one packed step, then decode steps over the paged cache
    (block size 4, so contexts span blocks): every row's logits within 1e-3 of HF's forward."""
    model, ref = loaded_models(arch), hf_models(arch)
    runner, blocks = small_block_runner(model)
    seqs = []
    for i, n in enumerate((5, 19, 3, 11)):
        ids = prompt_ids(n, seed=i)
        seqs.append(Sequence(GenerationRequest(id=str(i), prompt_token_ids=ids), list(ids), n))
        blocks.allocate(seqs[-1])

    def expected(i: int, seq: Sequence) -> torch.Tensor:
        with torch.no_grad():
            return ref(torch.tensor([seq.token_ids])).logits[0, -1]

    assert_steps_match(runner, blocks, seqs, 8, expected)


def small_block_runner(model, lora_op=None) -> tuple[ModelRunner, BlockManager]:
    """A runner over a 1 MiB cache of 4-token blocks, so contexts span several blocks."""
    cfg = model.hf_model.config
    cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                    4, 1 << 20, model.device, model.dtype)
    return ModelRunner(model, cache, lora_op), BlockManager(cache.num_blocks, 4)


def assert_steps_match(runner: ModelRunner, blocks: BlockManager, seqs: list[Sequence], steps: int,
                       expected) -> None:
    """One packed prefill, then `steps` greedy decode steps: before each step every row's logits
    are within 1e-3 of `expected(row, seq)` (fp32)."""
    logits = runner.run(seqs)
    for _ in range(steps):
        for i, (seq, row) in enumerate(zip(seqs, logits, strict=True)):
            torch.testing.assert_close(row, expected(i, seq), atol=1e-3, rtol=0)
        for seq, row in zip(seqs, logits, strict=True):
            seq.token_ids.append(int(row.argmax()))
            blocks.append(seq)
        logits = runner.run(seqs)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_generate(arch, make_engine, hf_models):
    engine = make_engine(arch)
    prompts = {f"p{n}": prompt_ids(n, seed=n) for n in PROMPT_LENGTHS}
    outcomes = run_requests(engine, [GenerationRequest(id=k, prompt_token_ids=v, params=greedy())
                                     for k, v in prompts.items()])
    for key, ids in prompts.items():
        r = result(outcomes[key])
        assert list(r.token_ids) == hf_greedy(hf_models(arch), ids, 12), key
        assert r.prompt_tokens == len(ids) and r.generated_tokens == len(r.token_ids)
        assert r.finish_reason in ("length", "eos_token")
        assert r.timings.queue_ms >= 0 and 0 < r.timings.ttft_ms <= r.timings.total_ms


def test_text_prompt_and_chat_template(make_engine, hf_models):
    engine = make_engine("llama")
    tok = engine.tokenizer
    messages = [{"role": "user", "content": "Hello there"}]
    outcomes = run_requests(engine, [
        GenerationRequest(id="text", prompt="The cat sat", params=greedy(6)),
        GenerationRequest(id="chat", messages=messages, params=greedy(6)),
    ])
    text_ids = tok("The cat sat")["input_ids"]
    chat_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    assert result(outcomes["chat"]).prompt_tokens == len(chat_ids)
    assert chat_ids[:1] == [tok.convert_tokens_to_ids("<|im_start|>")]
    for key, ids in (("text", text_ids), ("chat", chat_ids)):
        r = result(outcomes[key])
        assert list(r.token_ids) == hf_greedy(hf_models("llama"), ids, 6)
        assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)


# ---- continuous batching ---------------------------------------------------------------------

def test_join_mid_flight_does_not_change_outputs(make_engine, hf_models):
    engine = make_engine("llama")
    ids = {k: prompt_ids(n, seed=n + 100) for k, n in (("a", 7), ("b", 21), ("late", 13))}
    outcomes: dict = {}
    done = threading.Event()
    joined_at: list[int] = []

    def finish(outcome):
        outcomes[outcome.request_id] = outcome
        if len(outcomes) == 3:
            done.set()

    def on_token(event):
        if event.request_id == "a" and event.index == 4 and not joined_at:
            joined_at.append(engine.stats()["steps"])  # a and b are mid-flight: the late one joins
            engine.submit(GenerationRequest(id="late", prompt_token_ids=ids["late"], params=greedy(16)), None, finish)

    for key in ("a", "b"):
        engine.submit(GenerationRequest(id=key, prompt_token_ids=ids[key], params=greedy(16, ignore_eos=True)),
                      on_token, finish)
    assert done.wait(60)
    assert joined_at
    for key in ("a", "b"):
        assert list(result(outcomes[key]).token_ids) == _hf_no_eos(hf_models("llama"), ids[key], 16), key
    assert list(result(outcomes["late"]).token_ids) == hf_greedy(hf_models("llama"), ids["late"], 16)


def _hf_no_eos(model, ids, new):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_kv_budget_exhausted_waits_preempts_and_stays_exact(make_engine, hf_models):
    # tiny llama: one 4-token block = 2 (K, V) * 2 layers * 4 * 2 heads * 16 dims * 4 bytes = 2 KiB
    engine = make_engine("llama", kv_block_size=4, kv_cache_bytes=32 * 1024)
    assert engine.kv_cache.num_blocks == 16
    prompts = {f"p{i}": prompt_ids(n, seed=200 + i) for i, n in enumerate((10, 12, 9, 14, 11))}
    requests = [GenerationRequest(id=k, prompt_token_ids=v, params=greedy(20, ignore_eos=True))
                for k, v in prompts.items()]
    outcomes = run_requests(engine, requests, timeout=120)
    for key, ids in prompts.items():
        assert list(result(outcomes[key]).token_ids) == _hf_no_eos(hf_models("llama"), ids, 20), key
    stats = engine.stats()
    assert stats["preemptions"] > 0
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_free"] == 16


def test_max_model_len_capped_by_kv_cache_and_length_finish(make_engine):
    engine = make_engine("llama", kv_block_size=4, kv_cache_bytes=16 * 1024)  # 8 blocks of 4 tokens
    assert engine.max_model_len == 32
    outcomes = run_requests(engine, [
        GenerationRequest(id="fits", prompt_token_ids=prompt_ids(28, 1), params=greedy(50, ignore_eos=True)),
        GenerationRequest(id="long", prompt_token_ids=prompt_ids(32, 2), params=greedy(5)),
    ])
    r = result(outcomes["fits"])
    assert r.finish_reason == "length" and r.generated_tokens == 4
    failure(outcomes["long"], ErrorType.PROMPT_TOO_LONG)


@pytest.mark.parametrize("do_sample", [False, True])
def test_sampling_reproducible_across_batch_mixes(make_engine, do_sample):
    engine = make_engine("llama")
    params = SamplingParams(max_new_tokens=10, do_sample=do_sample, temperature=0.9, top_k=50, seed=1234)
    ids = prompt_ids(15, 7)
    alone = run_requests(engine, [GenerationRequest(id="x", prompt_token_ids=ids, params=params)])
    others = [GenerationRequest(id=f"o{i}", prompt_token_ids=prompt_ids(5 + 3 * i, i),
                                params=SamplingParams(max_new_tokens=4 + i, do_sample=True, seed=i))
              for i in range(6)]
    mixed = run_requests(engine, [*others[:3], GenerationRequest(id="x", prompt_token_ids=ids, params=params),
                                  *others[3:]])
    assert result(alone["x"]).token_ids == result(mixed["x"]).token_ids
    assert result(mixed["x"]).seed == 1234


# ---- request lifecycle -----------------------------------------------------------------------

def test_prompt_too_long(make_engine):
    engine = make_engine("llama", max_model_len=16)
    outcomes = run_requests(engine, [
        GenerationRequest(id="too_long", prompt_token_ids=prompt_ids(16, 0)),
        GenerationRequest(id="edge", prompt_token_ids=prompt_ids(15, 0), params=greedy(10, ignore_eos=True)),
    ])
    assert "16 tokens" in failure(outcomes["too_long"], ErrorType.PROMPT_TOO_LONG).error.message
    r = result(outcomes["edge"])
    assert r.generated_tokens == 1 and r.finish_reason == "length"


def test_validation_errors(make_engine):
    engine = make_engine("llama", max_new_tokens_limit=8, max_stop_sequences=1)
    outcomes = run_requests(engine, [
        GenerationRequest(id="many_new", prompt="hi", params=greedy(9)),
        GenerationRequest(id="stops", prompt="hi", params=greedy(4, stop=("a", "b"))),
        GenerationRequest(id="bad_ids", prompt_token_ids=[1, 10_000]),
        GenerationRequest(id="empty", prompt=""),
        GenerationRequest(id="ok", prompt="hi", params=greedy(8)),
    ])
    for key in ("many_new", "stops", "bad_ids", "empty"):
        failure(outcomes[key], ErrorType.VALIDATION)
    result(outcomes["ok"])


def test_eos_finishes_with_eos_token(make_engine, loaded_models):
    ids = prompt_ids(12, 3)
    engine = make_engine("llama")
    first = result(run_requests(engine, [GenerationRequest(id="a", prompt_token_ids=ids, params=greedy(8))])["a"])
    # make the model's 3rd greedy token an end-of-sequence token
    model = dataclasses.replace(loaded_models("llama"), eos_token_ids=frozenset({first.token_ids[2]}))
    eos_engine = Engine(EngineConfig(model="unused"), model=model)
    try:
        r = result(run_requests(eos_engine, [GenerationRequest(id="b", prompt_token_ids=ids, params=greedy(8))])["b"])
    finally:
        eos_engine.shutdown(10)
    assert r.finish_reason == "eos_token"
    assert r.token_ids == first.token_ids[:3]


def test_stream_events_and_logprobs(make_engine):
    engine = make_engine("llama")
    events = []
    outcomes = run_requests(engine, [GenerationRequest(id="s", prompt="abc", params=greedy(6, logprobs=True))],
                            on_token=events.append)
    r = result(outcomes["s"])
    assert [e.index for e in events] == list(range(6))
    assert tuple(e.token_id for e in events) == r.token_ids
    assert "".join(e.text for e in events) == r.text
    assert r.tokens == tuple(events) and all(e.logprob is not None and e.logprob <= 0 for e in events)


def test_cancel_running_and_unknown(make_engine):
    engine = make_engine("llama")
    outcomes = {}
    done = threading.Event()

    def finish(outcome):
        outcomes[outcome.request_id] = outcome
        done.set()

    def on_token(event):
        if event.index == 2:
            assert engine.cancel("c")

    engine.submit(GenerationRequest(id="c", prompt="hello", params=greedy(400, ignore_eos=True)), on_token, finish)
    assert done.wait(30)
    assert failure(outcomes["c"], ErrorType.INTERNAL).error.message == "cancelled"
    assert not engine.cancel("c") and not engine.cancel("never-seen")
    _wait_for(lambda: engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0)


def test_deadline_exceeded_is_never_computed(make_engine):
    engine = make_engine("llama")
    outcomes = run_requests(engine, [GenerationRequest(id="late", prompt="x", deadline=time.time() - 1)])
    failure(outcomes["late"], ErrorType.DEADLINE_EXCEEDED)
    assert engine.stats()["steps"] == 0


def test_queue_bound_overloaded(make_engine):
    engine = make_engine("llama", max_batch=1, max_waiting=1)
    requests = [GenerationRequest(id=f"r{i}", prompt="hello", params=greedy(30, ignore_eos=True)) for i in range(6)]
    outcomes = run_requests(engine, requests)
    overloaded = [o for o in outcomes.values() if isinstance(o, GenerationFailure)]
    assert overloaded and all(o.error.type is ErrorType.OVERLOADED and o.error.retryable for o in overloaded)
    assert sum(isinstance(o, Completion) for o in outcomes.values()) >= 1


def test_exception_in_step_fails_only_that_step(make_engine, hf_models):
    engine = make_engine("llama", max_batch=1)
    real_run = engine.runner.run
    calls = {"n": 0}

    def flaky_run(seqs, num_new):
        calls["n"] += 1
        if calls["n"] == 3:  # the second decode step of the first request
            raise RuntimeError("boom")
        return real_run(seqs, num_new)

    engine.runner.run = flaky_run
    ids = prompt_ids(9, 5)
    outcomes = run_requests(engine, [
        GenerationRequest(id="victim", prompt="hello", params=greedy(10, ignore_eos=True)),
        GenerationRequest(id="waiting", prompt_token_ids=ids, params=greedy(10)),
    ])
    err = failure(outcomes["victim"], ErrorType.INTERNAL).error
    assert err.retryable and "boom" in err.message
    assert list(result(outcomes["waiting"]).token_ids) == hf_greedy(hf_models("llama"), ids, 10)
    stats = engine.stats()
    assert stats["step_failures"] == 1 and stats["kv_blocks_used"] == 0
    # the engine keeps serving
    assert isinstance(run_requests(engine, [GenerationRequest(id="after", prompt="x", params=greedy(3))])["after"],
                      Completion)


def test_shutdown_finishes_running_and_fails_waiting(make_engine):
    engine = make_engine("llama", max_batch=1)
    outcomes = {}
    lock = threading.Lock()
    started = threading.Event()

    def finish(outcome):
        with lock:
            outcomes[outcome.request_id] = outcome

    engine.submit(GenerationRequest(id="running", prompt="a", params=greedy(40, ignore_eos=True)),
                  lambda e: started.set(), finish)
    for i in range(3):
        engine.submit(GenerationRequest(id=f"waiting{i}", prompt="b", params=greedy(5)), None, finish)
    assert started.wait(30)
    engine.shutdown(timeout=30)
    assert result(outcomes["running"]).generated_tokens == 40
    for i in range(3):
        assert failure(outcomes[f"waiting{i}"], ErrorType.OVERLOADED).error.retryable
    engine.submit(GenerationRequest(id="after", prompt="c"), None, finish)
    assert failure(outcomes["after"], ErrorType.OVERLOADED).error.retryable


def test_waiting_counts_requests_not_yet_taken_in(make_engine):
    """`waiting` counts the requests of a group still in the inbox, not inbox commands."""
    engine = make_engine("llama")
    blocked, go, done = threading.Event(), threading.Event(), threading.Event()
    outcomes: dict = {}

    def hold_engine_thread(event) -> None:
        blocked.set()
        go.wait(30)

    def finish(outcome) -> None:
        outcomes[outcome.request_id] = outcome
        if len(outcomes) == 6:
            done.set()

    engine.submit(GenerationRequest(id="block", prompt="a", params=greedy(1, ignore_eos=True)), hold_engine_thread,
                  finish)
    assert blocked.wait(30)  # the step thread is inside our callback: it takes nothing in
    engine.submit_many([(GenerationRequest(id=f"g{i}", prompt="b", params=greedy(1)), None, finish)
                        for i in range(5)])
    try:
        stats = engine.stats()
        assert stats["waiting"] == 5 and stats["running"] == 1
    finally:
        go.set()
    assert done.wait(30) and all(isinstance(o, Completion) for o in outcomes.values())
    assert engine.stats()["waiting"] == 0


def test_stats_keys(make_engine):
    engine = make_engine("llama")
    run_requests(engine, [GenerationRequest(id="s", prompt="abc", params=greedy(4, ignore_eos=True))])
    stats = engine.stats()
    assert stats["steps"] == 4 and stats["generated_tokens"] == 4 and stats["prefill_tokens"] == 3
    for key in ("running", "waiting", "kv_blocks_used", "kv_blocks_free", "kv_blocks_total", "adapters",
                "preemptions", "active_adapters"):
        assert key in stats


def _wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "condition not reached"
        time.sleep(0.01)


# ---- many adapters in one batch, exact against PEFT -------------------------------------------

ADAPTERS = {  # name -> make_adapter kwargs: ranks 1..32, alpha, rslora, patterns, attention-only and all-linear
    "qv_r8": dict(r=8, alpha=16, targets=("q_proj", "v_proj")),
    "all_r4": dict(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "attn_r16_rslora": dict(r=16, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora=True),
    "mlp_r2": dict(r=2, alpha=4, targets=("gate_proj", "up_proj", "down_proj")),
    "patterns": dict(r=8, alpha=8, targets=("q_proj", "v_proj", "o_proj"), rank_pattern={"q_proj": 4},
                     alpha_pattern={"v_proj": 32}),
    "o_r1": dict(r=1, alpha=2, targets=("o_proj",)),
    "all_r32_rslora": dict(r=32, alpha=16, use_rslora=True,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "kv_down_r12": dict(r=12, alpha=24, targets=("k_proj", "v_proj", "down_proj")),
}


@pytest.fixture(scope="module")
def peft_setup(tiny_model_dirs, tmp_path_factory):
    """arch -> (adapter root, PeftModel with every adapter loaded, on its own copy of the base)."""
    return peft_per_arch(tiny_model_dirs, tmp_path_factory, ADAPTERS, seed=10, prefix="adapters")


def _peft_greedy(peft, adapter: str | None, ids: list[int], new: int) -> list[int]:
    kw = dict(attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=new, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        if adapter is None:
            with peft.disable_adapter():
                out = peft.generate(input_ids=torch.tensor([ids]), **kw)
        else:
            peft.set_adapter(adapter)
            out = peft.generate(input_ids=torch.tensor([ids]), **kw)
    return out[0, len(ids):].tolist()


def _rows() -> list[tuple[str | None, int]]:
    """(adapter or None, prompt length) per row: every adapter, some twice, base rows between."""
    names = list(ADAPTERS)
    rows = [(name, 4 + 3 * i) for i, name in enumerate(names)]
    rows += [(None, 11), (names[2], 9), (None, 5), (names[6], 18)]
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_adapters_logits_match_peft(arch, loaded_models, peft_setup):
    """All adapters and base rows in one packed batch through the runner and the LoRA op: each
    row's logits within 1e-3 of PEFT running that adapter alone, on prefill and decode steps."""
    from engine.adapter import load_peft_adapter
    from engine.lora_op import build_lora_op
    from engine.lora_slots import LoraSlots

    root, peft = peft_setup(arch)
    model = loaded_models(arch)
    slots = LoraSlots(model.spec, len(ADAPTERS), 64, model.device, model.dtype)
    slot_of = {}
    for slot, name in enumerate(ADAPTERS):
        slots.load(slot, load_peft_adapter(root / name, model.spec, model.dtype, 64, False))
        slot_of[name] = slot
    runner, blocks = small_block_runner(model, build_lora_op("torch", slots))
    seqs, adapters = [], []
    for i, (adapter, n) in enumerate(_rows()):
        ids = prompt_ids(n, seed=300 + i)
        seq = Sequence(GenerationRequest(id=str(i), prompt_token_ids=ids), list(ids), n)
        seq.adapter_slot = slot_of[adapter] if adapter else -1
        blocks.allocate(seq)
        seqs.append(seq)
        adapters.append(adapter)
    assert_steps_match(runner, blocks, seqs, 4,
                       lambda i, seq: peft_logits(peft, adapters[i], seq.token_ids)[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_adapters_greedy_match_peft(arch, make_engine, peft_setup):
    """Through the whole engine (adapter store, slots, scheduler): 8 adapters + base rows submitted
    together; every row's greedy tokens equal PEFT generating with that adapter alone."""
    root, peft = peft_setup(arch)
    engine = make_engine(arch, adapter_root=str(root), adapter_slots=8, max_lora_rank=32)
    requests, expected = [], {}
    for i, (adapter, n) in enumerate(_rows()):
        ids = prompt_ids(n, seed=400 + i)
        rid = f"{adapter or 'base'}-{i}"
        requests.append(GenerationRequest(id=rid, prompt_token_ids=ids, params=greedy(10),
                                          adapter=AdapterRef(adapter) if adapter else None))
        expected[rid] = _peft_greedy(peft, adapter, ids, 10)
    outcomes = run_requests(engine, requests, timeout=120)
    for rid, tokens in expected.items():
        r = result(outcomes[rid])
        assert list(r.token_ids) == tokens, rid
        assert r.adapter_id == (None if rid.startswith("base") else rid.rsplit("-", 1)[0])
    stats = engine.stats()
    assert stats["adapters"]["device"]["pinned"] == 0 and stats["kv_blocks_used"] == 0


def test_group_submitted_together_shares_one_prefill(make_engine, peft_setup):
    """submit_many: the step thread takes in the whole group before its next step, so requests
    for resident adapters and base rows are prefilled in one step instead of racing the loop."""
    root, _ = peft_setup("llama")
    engine = make_engine("llama", adapter_root=str(root), adapter_slots=8, max_lora_rank=32)

    def group(tag: str) -> list[GenerationRequest]:
        return [GenerationRequest(id=f"{tag}{i}", prompt_token_ids=prompt_ids(6 + i, seed=700 + i),
                                  params=greedy(1), adapter=AdapterRef(a) if a else None)
                for i, a in enumerate([None, *ADAPTERS])]

    run_requests(engine, group("warm-"), timeout=60)  # every adapter loaded into a device slot
    steps = engine.num_steps
    requests, outcomes, done = group("g-"), {}, threading.Event()

    def finish(outcome) -> None:
        outcomes[outcome.request_id] = outcome
        if len(outcomes) == len(requests):
            done.set()

    engine.submit_many([(r, None, finish) for r in requests])
    assert done.wait(60)
    assert all(isinstance(o, Completion) for o in outcomes.values())
    assert engine.num_steps - steps == 1  # one prefill step sampled every request's only token


def test_adapter_load_ms_only_for_requests_that_waited_for_a_load(make_engine, peft_setup):
    root, _ = peft_setup("llama")
    engine = make_engine("llama", adapter_root=str(root))
    qv = AdapterRef("qv_r8")
    first = run_requests(engine, [GenerationRequest(id="cold", prompt="a", params=greedy(2), adapter=qv)])
    assert result(first["cold"]).timings.adapter_load_ms > 0  # its adapter was loaded while it waited
    again = run_requests(engine, [GenerationRequest(id="warm", prompt="a", params=greedy(2), adapter=qv),
                                  GenerationRequest(id="base", prompt="a", params=greedy(2))])
    assert result(again["warm"]).timings.adapter_load_ms == 0  # resident: it waited for no load
    assert result(again["base"]).timings.adapter_load_ms == 0


def test_prefetch_leases_released_whether_requests_run_or_not(make_engine, peft_setup):
    """Every prefetch lease `submit` takes is released exactly when its request is admitted or
    leaves without running (rejected, expired, adapter failed), and a caller's own lease is
    released by the caller, once however often it calls."""
    root, _ = peft_setup("llama")
    engine = make_engine("llama", adapter_root=str(root), max_new_tokens_limit=8)
    store = engine.adapter_store
    taken, prefetch = [], store.prefetch

    def spy(ref):
        lease = prefetch(ref)
        taken.append(lease)
        return lease

    store.prefetch = spy
    own = engine.prefetch(AdapterRef("o_r1"))
    outcomes = run_requests(engine, [
        GenerationRequest(id="ran", prompt="a", params=greedy(2), adapter=AdapterRef("qv_r8")),
        GenerationRequest(id="rejected", prompt="a", params=greedy(9), adapter=AdapterRef("mlp_r2")),
        GenerationRequest(id="expired", prompt="a", adapter=AdapterRef("all_r4"), deadline=time.time() - 1),
        GenerationRequest(id="missing", prompt="a", params=greedy(2), adapter=AdapterRef("no/such/adapter")),
    ])
    result(outcomes["ran"])
    failure(outcomes["rejected"], ErrorType.VALIDATION)
    failure(outcomes["expired"], ErrorType.DEADLINE_EXCEEDED)
    failure(outcomes["missing"], ErrorType.ADAPTER_NOT_FOUND)
    assert len(taken) == 5 and all(lease.released for lease in taken[1:])  # taken[0]: ours
    assert not own.released and store._holds == {"local:o_r1": 1}
    own.release()
    own.release()
    assert store._holds == {}


def test_bad_adapter_fails_its_own_requests_only(make_engine, peft_setup):
    root, _ = peft_setup("llama")
    engine = make_engine("llama", adapter_root=str(root))
    outcomes = run_requests(engine, [
        GenerationRequest(id="missing", prompt="a", adapter=AdapterRef("no/such/adapter")),
        GenerationRequest(id="escape", prompt="a", adapter=AdapterRef("../etc")),
        GenerationRequest(id="good", prompt="a", params=greedy(4), adapter=AdapterRef("qv_r8")),
        GenerationRequest(id="base", prompt="a", params=greedy(4)),
    ])
    failure(outcomes["missing"], ErrorType.ADAPTER_NOT_FOUND)
    assert isinstance(outcomes["escape"], GenerationFailure)
    assert result(outcomes["good"]).adapter_id == "qv_r8"
    result(outcomes["base"])


# ---- the embedded SmolLM2 model ----------------------------------------------------------------

SMOL_ADAPTERS = {
    "qv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "attn_r16_rslora": dict(r=16, lora_alpha=16, use_rslora=True,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp_r4": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all_r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]),
}


@pytest.mark.slow
def test_embedded_smollm2_mixed_adapters_match_peft(tmp_path):
    """SmolLM2-135M (the embedded GGUF) with 4 adapters and base rows in one batch: greedy tokens
    identical to PEFT with each adapter alone, and prefill logits within 1e-3."""
    import copy

    from peft import LoraConfig, get_peft_model

    from engine.adapter import load_peft_adapter
    from engine.lora_op import build_lora_op
    from engine.lora_slots import LoraSlots
    from engine.model_loader import load_model

    model = load_model(EngineConfig())
    peft = None
    gen = torch.Generator().manual_seed(0)
    for name, kw in SMOL_ADAPTERS.items():
        cfg = LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **kw)
        if peft is None:
            peft = get_peft_model(copy.deepcopy(model.hf_model), cfg, adapter_name=name)
        else:
            peft.add_adapter(name, cfg)
        with torch.no_grad():
            for pname, p in peft.named_parameters():
                if f"lora_A.{name}." in pname or f"lora_B.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        peft.save_pretrained(tmp_path, selected_adapters=[name])
    peft.eval()
    tok = model.tokenizer
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Explain gravity to a child in two sentences.", "List three colors.", "Say hello."]
    rows = [*SMOL_ADAPTERS, None]
    prompts = {}
    for i, adapter in enumerate(rows):
        text = tok.apply_chat_template([{"role": "user", "content": questions[i % len(questions)]}],
                                       tokenize=False, add_generation_prompt=True)
        prompts[f"{adapter or 'base'}"] = (adapter, tok(text, add_special_tokens=False)["input_ids"])

    # logits: one packed prefill through the runner and the LoRA op
    slots = LoraSlots(model.spec, len(SMOL_ADAPTERS), 16, model.device, model.dtype)
    for slot, name in enumerate(SMOL_ADAPTERS):
        slots.load(slot, load_peft_adapter(tmp_path / name, model.spec, model.dtype, 16, False))
    cfg = model.hf_model.config
    cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, 64, 16, 64 << 20, model.device, model.dtype)
    blocks = BlockManager(cache.num_blocks, 16)
    runner = ModelRunner(model, cache, build_lora_op("torch", slots))
    seqs = []
    for key, (adapter, ids) in prompts.items():
        seq = Sequence(GenerationRequest(id=key, prompt_token_ids=ids), list(ids), len(ids))
        seq.adapter_slot = list(SMOL_ADAPTERS).index(adapter) if adapter else -1
        blocks.allocate(seq)
        seqs.append(seq)
    logits = runner.run(seqs)
    for seq, row in zip(seqs, logits, strict=True):
        adapter = prompts[seq.request_id][0]
        torch.testing.assert_close(row, peft_logits(peft, adapter, seq.token_ids)[-1], atol=1e-3, rtol=0)

    # greedy: the whole engine, all rows submitted together
    engine = Engine(EngineConfig(adapter_root=str(tmp_path), max_lora_rank=16, adapter_slots=4), model=model)
    try:
        outcomes = run_requests(engine, [
            GenerationRequest(id=key, prompt_token_ids=ids, params=greedy(12),
                              adapter=AdapterRef(adapter) if adapter else None)
            for key, (adapter, ids) in prompts.items()], timeout=300)
    finally:
        engine.shutdown(30)
    texts = {}
    for key, (adapter, ids) in prompts.items():
        r = result(outcomes[key])
        assert list(r.token_ids) == _peft_greedy(peft, adapter, ids, 12), key
        texts[key] = r.text
    assert len(set(texts.values())) > 1  # the adapters change the output

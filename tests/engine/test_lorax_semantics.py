"""LoRAX's generate parameters on the real engine (issue 13 point 1, docs/lorax.md): temperature 0,
the sampling rule, truncate, ignore_eos_token, decoder_input_details, return_k_alternatives,
best_of, frequency / presence penalties and seeds across batch mixes. References: transformers'
own forward for the tiny model (and PEFT for an adapter row)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import (
    AdapterRef,
    Completion,
    ErrorType,
    GenerationFailure,
    GenerationRequest,
    SamplingParams,
)
from tests.builders import make_adapter, run_requests


def ids_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n,), generator=g).tolist()


def done(outcome) -> Completion:
    assert isinstance(outcome, Completion), outcome
    return outcome


def request(rid: str, ids: list[int], **params) -> GenerationRequest:
    return GenerationRequest(id=rid, prompt_token_ids=ids, params=SamplingParams(**params))


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the reference model's logits at every position: [len(ids), V]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def hf_greedy(model, ids: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_temperature_zero_is_greedy_even_with_do_sample(make_engine, hf_models):
    engine = make_engine("llama")
    ids = ids_of(14, 1)
    out = run_requests(engine, [
        request("plain", ids, max_new_tokens=10, ignore_eos=True),
        request("t0", ids, max_new_tokens=10, ignore_eos=True, temperature=0.0),
        request("t0_sample", ids, max_new_tokens=10, ignore_eos=True, temperature=0.0, do_sample=True,
                top_k=5, seed=3),
        GenerationRequest(id="lorax_t0", prompt_token_ids=ids, params=SamplingParams.lorax(
            temperature=0.0, top_p=0.5, max_new_tokens=10, ignore_eos=True)),
    ])
    expected = hf_greedy(hf_models("llama"), ids, 10)
    for key in out:
        assert list(done(out[key]).token_ids) == expected, key


def test_lorax_rule_samples_whenever_a_warper_is_set(make_engine):
    engine = make_engine("llama")
    ids = ids_of(10, 2)
    warped = SamplingParams.lorax(temperature=1.5, seed=11, max_new_tokens=16, ignore_eos=True)
    assert warped.do_sample and not warped.greedy
    explicit = SamplingParams(do_sample=True, temperature=1.5, seed=11, max_new_tokens=16, ignore_eos=True)
    greedy = SamplingParams(temperature=1.5, max_new_tokens=16, ignore_eos=True)  # v1: do_sample switches
    out = run_requests(engine, [GenerationRequest(id=k, prompt_token_ids=ids, params=p)
                                for k, p in (("lorax", warped), ("explicit", explicit), ("greedy", greedy))])
    assert done(out["lorax"]).token_ids == done(out["explicit"]).token_ids != done(out["greedy"]).token_ids
    assert done(out["lorax"]).seed == 11


def test_truncate_keeps_the_last_prompt_tokens(make_engine):
    engine = make_engine("llama", max_model_len=64)
    ids = ids_of(30, 3)
    out = run_requests(engine, [
        GenerationRequest(id="cut", prompt_token_ids=ids, truncate=9, params=SamplingParams(max_new_tokens=6)),
        GenerationRequest(id="tail", prompt_token_ids=ids[-9:], params=SamplingParams(max_new_tokens=6)),
        GenerationRequest(id="long", prompt_token_ids=ids, truncate=100, params=SamplingParams(max_new_tokens=6)),
        GenerationRequest(id="text", prompt="x" * 40, truncate=5, params=SamplingParams(max_new_tokens=3,
                                                                                       prompt_logprobs=True)),
    ])
    cut, tail = done(out["cut"]), done(out["tail"])
    assert cut.prompt_tokens == 9 and cut.token_ids == tail.token_ids
    failure = out["long"]
    assert isinstance(failure, GenerationFailure) and failure.error.type is ErrorType.VALIDATION
    assert "truncate must be at most 63" in failure.error.message
    text = done(out["text"])
    assert text.prompt_tokens == 5 and [t.text for t in text.prefill] == ["x"] * 5


def test_ignore_eos_token_and_special_tokens(make_engine, loaded_models):
    ids = ids_of(12, 4)
    first = done(run_requests(make_engine("llama"), [request("a", ids, max_new_tokens=8)])["a"])
    eos = first.token_ids[-1]  # make the model's last greedy token its end-of-sequence token
    model = dataclasses.replace(loaded_models("llama"), eos_token_ids=frozenset({eos}))
    engine = Engine(EngineConfig(model="unused"), model=model)
    engine._special_ids = frozenset({eos})  # and a special token, as end-of-sequence tokens are
    try:
        out = run_requests(engine, [request("stops", ids, max_new_tokens=8, logprobs=True),
                                    request("ignores", ids, max_new_tokens=8, logprobs=True, ignore_eos=True)])
    finally:
        engine.shutdown(10)
    stops, ignores = done(out["stops"]), done(out["ignores"])
    cut = first.token_ids.index(eos) + 1
    assert stops.finish_reason == "eos_token" and stops.token_ids == first.token_ids[:cut]
    assert ignores.finish_reason == "length" and ignores.token_ids == first.token_ids
    assert [t.special for t in ignores.tokens] == [t == eos for t in ignores.token_ids]
    assert stops.tokens[-1].special


def test_decoder_input_details_are_the_prompt_logprobs(make_engine, hf_models, loaded_models):
    """details.prefill: every prompt token, decoded alone, with log p(token | tokens before it) from
    the raw logits; the first has none. Scored and unscored rows share the prefill step."""
    engine = make_engine("llama")
    tok = loaded_models("llama").tokenizer
    prompts = {"a": ids_of(17, 5), "b": ids_of(6, 6), "c": [1, *ids_of(40, 7)]}  # c starts with a special
    out = run_requests(engine, [
        request("a", prompts["a"], max_new_tokens=3, prompt_logprobs=True),
        request("b", prompts["b"], max_new_tokens=3),
        request("c", prompts["c"], max_new_tokens=3, prompt_logprobs=True, repetition_penalty=1.5),
    ])
    assert done(out["b"]).prefill == ()
    for key in ("a", "c"):
        ids, prefill = prompts[key], done(out[key]).prefill
        assert [t.token_id for t in prefill] == ids
        assert [t.text for t in prefill] == [tok.decode([t], skip_special_tokens=False) for t in ids]
        assert prefill[0].logprob is None
        expected = hf_logprobs(hf_models("llama"), ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor([t.logprob for t in prefill[1:]]), expected,
                                   rtol=0, atol=1e-4)
    assert done(out["c"]).prefill[0].text == "<|im_start|>"


def test_decoder_input_details_with_an_adapter_match_peft(make_engine, tiny_model_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    make_adapter(tiny_model_dirs["llama"], tmp_path / "ad", r=4, targets=("q_proj", "v_proj", "down_proj"),
                 seed=21, scale=0.2)
    engine = make_engine("llama", adapter_root=str(tmp_path))
    ids = ids_of(21, 8)
    r = GenerationRequest(id="p", prompt_token_ids=ids, adapter=AdapterRef("ad"),
                          params=SamplingParams(max_new_tokens=2, prompt_logprobs=True))
    prefill = done(run_requests(engine, [r, request("base", ids, max_new_tokens=2)])["p"]).prefill
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    expected = hf_logprobs(peft, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([t.logprob for t in prefill[1:]]), expected, rtol=0, atol=1e-4)


def test_return_k_alternatives(make_engine, hf_models):
    """Per token: the k most likely ids of the distribution its logprob comes from, most likely
    first; for greedy decoding without penalties the first one is the chosen token itself."""
    engine = make_engine("llama")
    ids = ids_of(9, 9)
    events = []
    out = run_requests(engine, [request("k", ids, max_new_tokens=6, logprobs=True, return_k_alternatives=4,
                                        ignore_eos=True),
                                request("none", ids, max_new_tokens=6, logprobs=True)], on_token=events.append)
    k = done(out["k"])
    assert all(t.alternatives is None for t in done(out["none"]).tokens)
    reference = hf_logprobs(hf_models("llama"), ids + list(k.token_ids))[len(ids) - 1:-1]  # [6, V]
    for step, token in enumerate(k.tokens):
        alts = token.alternatives
        assert len(alts) == 4 and alts[0].token_id == token.token_id
        assert alts[0].logprob == pytest.approx(token.logprob, abs=1e-6)
        top = torch.topk(reference[step], 4)
        assert [a.token_id for a in alts] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([a.logprob for a in alts]), top.values, rtol=0, atol=1e-4)
        if step < len(k.tokens) - 1:  # (the last one's text is flushed: an incomplete char as U+FFFD)
            assert alts[0].text == token.text  # decoded where the token went
    assert [e.alternatives for e in events if e.request_id == "k"] == [t.alternatives for t in k.tokens]


def test_frequency_and_presence_penalties_match_loraxs_processor(make_engine, hf_models):
    """Greedy with both penalties against a step-by-step reference: LoRAX's processor math on the
    reference model's logits (counts over prompt + output, divided by their number)."""
    engine = make_engine("llama")
    ids = [5, 5, 5, 9, 9, *ids_of(8, 10)]
    r = done(run_requests(engine, [request("f", ids, max_new_tokens=8, ignore_eos=True, frequency_penalty=1.5,
                                           presence_penalty=0.7)])["f"])
    history = list(ids)
    model = hf_models("llama")
    for _ in range(8):
        with torch.no_grad():
            logits = model(torch.tensor([history])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(history), minlength=logits.shape[0]).float()
        logits -= 1.5 * counts / len(history) + 0.7 * (counts > 0).float()
        history.append(int(logits.argmax()))
    assert list(r.token_ids) == history[len(ids):]
    plain = done(run_requests(engine, [request("p", ids, max_new_tokens=8, ignore_eos=True)])["p"])
    assert plain.token_ids != r.token_ids  # the penalties changed the output


def test_best_of_answers_with_the_most_likely_sequence(make_engine):
    engine = make_engine("llama")
    ids = ids_of(11, 11)
    params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.4, best_of=3, ignore_eos=True)
    out = run_requests(engine, [GenerationRequest(id="b", prompt_token_ids=ids, params=params),
                                request("other", ids_of(5, 12), max_new_tokens=4)])
    best = done(out["b"])
    others = best.best_of_sequences
    assert len(others) == 2 and best.request_id == "b" and all(o.request_id == "b" for o in others)
    seeds = {best.seed, *(o.seed for o in others)}
    assert len(seeds) == 3 and None not in seeds  # each sequence its own fresh seed
    assert best.tokens == () and all(o.tokens == () for o in others)  # logprobs were not asked for

    # rerun the three seeds alone, with logprobs: the answer is the highest mean token logprob
    reruns = run_requests(engine, [
        GenerationRequest(id=f"s{seed}", prompt_token_ids=ids,
                          params=dataclasses.replace(params, best_of=1, seed=seed, logprobs=True))
        for seed in seeds])
    means = {done(c).seed: sum(t.logprob for t in done(c).tokens) / len(done(c).tokens) for c in reruns.values()}
    assert best.seed == max(means, key=means.get)
    by_seed = {done(c).seed: done(c) for c in reruns.values()}
    for seq in (best, *others):
        assert seq.token_ids == by_seed[seq.seed].token_ids


def test_best_of_failure_and_cancel(make_engine):
    engine = make_engine("llama", adapter_root="/nonexistent-adapter-root")
    params = SamplingParams(max_new_tokens=4, do_sample=True, best_of=2)
    failed = run_requests(engine, [GenerationRequest(id="f", prompt_token_ids=[5, 6], params=params,
                                                     adapter=AdapterRef("missing"))])["f"]
    assert isinstance(failed, GenerationFailure) and failed.request_id == "f"

    outcomes: list = []
    finished = threading.Event()
    long = dataclasses.replace(params, max_new_tokens=400, ignore_eos=True)
    engine.submit(GenerationRequest(id="c", prompt_token_ids=[5, 6, 7], params=long), None,
                  lambda o: (outcomes.append(o), finished.set()))
    assert engine.cancel("c")
    assert finished.wait(30)
    assert len(outcomes) == 1 and isinstance(outcomes[0], GenerationFailure)
    assert outcomes[0].error.message == "cancelled" and not engine.cancel("c")


def test_seed_gives_the_same_text_whatever_shares_the_batch(make_engine):
    """A seeded LoRAX-rule row with penalties and alternatives, alone and in mixes of greedy rows,
    other seeds, scored prompts, best_of groups and longer prompts: the same tokens and text."""
    engine = make_engine("llama")
    ids = ids_of(13, 13)
    params = SamplingParams.lorax(temperature=0.9, top_p=0.95, top_k=60, frequency_penalty=0.4,
                                  presence_penalty=0.2, repetition_penalty=1.1, seed=2024, max_new_tokens=14,
                                  ignore_eos=True, return_k_alternatives=2, logprobs=True)
    x = GenerationRequest(id="x", prompt_token_ids=ids, params=params)

    def others(tag: str, n: int) -> list[GenerationRequest]:
        return [GenerationRequest(id=f"{tag}{i}", prompt_token_ids=ids_of(4 + 7 * i, 100 + i),
                                  params=SamplingParams.lorax(
                                      max_new_tokens=3 + 2 * i, temperature=[0.0, 1.2, 0.7][i % 3],
                                      prompt_logprobs=i % 2 == 0, best_of=2 if i == 1 else 1))
                for i in range(n)]

    runs = [run_requests(engine, [x]),
            run_requests(engine, [*others("m", 3), x]),
            run_requests(engine, [x, *others("n", 6)]),
            run_requests(engine, [*others("o", 2), x, *others("p", 4)])]
    alone = done(runs[0]["x"])
    assert len(set(alone.token_ids)) > 3
    for run in runs[1:]:
        mixed = done(run["x"])
        assert (mixed.token_ids, mixed.text, mixed.seed) == (alone.token_ids, alone.text, 2024)
        for a, b in zip(mixed.tokens, alone.tokens, strict=True):
            assert [t.token_id for t in a.alternatives] == [t.token_id for t in b.alternatives]
            assert [t.logprob for t in a.alternatives] == pytest.approx([t.logprob for t in b.alternatives],
                                                                        abs=1e-5)


def test_detokenizer_peek_is_the_text_a_token_would_add(loaded_models):
    from engine.detokenizer import Detokenizer

    tok = loaded_models("llama").tokenizer
    ids = tok("héllo")["input_ids"]  # é is two byte tokens
    d = Detokenizer(tok, [5, 6])
    d.add(ids[0])  # "h"
    e1, e2 = ids[1], ids[2]
    assert d.peek([e1, ids[0], 2]) == ["", "h", "<|im_end|>"]  # half a character: nothing yet
    assert d.add(e1) == ("", False)
    assert d.peek([e2]) == ["é"]  # the held-back byte comes with it
    assert d.text == "h"  # peeking changed nothing

"""Sampler against transformers' logits processors, greedy, seeds across batch mixes, logprobs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from engine.request import SamplingParams
from engine.sampler import Sampler, SamplingState, apply_frequency_penalties, apply_repetition_penalty, warp

V = 97


def hf_processors(p: SamplingParams) -> LogitsProcessorList:
    """What transformers' generate builds for these params, in its order."""
    procs = LogitsProcessorList()
    if p.repetition_penalty is not None:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.do_sample:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k is not None:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p is not None and p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
        if p.typical_p is not None and p.typical_p < 1.0:
            procs.append(TypicalLogitsWarper(p.typical_p))
    return procs


def ours(row: torch.Tensor, p: SamplingParams, history: list[int]) -> torch.Tensor:
    row = row.clone()
    if p.repetition_penalty is not None:
        apply_repetition_penalty(row, history, p.repetition_penalty)
    if p.do_sample:
        row = warp(row / p.temperature, p)
    return row


def random_logits(seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, V, generator=g) * 3
    logits[:, 10:14] = logits[:, 9:10]  # ties, to pin the boundary rules
    return logits


PARAMS = [
    SamplingParams(do_sample=True),
    SamplingParams(do_sample=True, temperature=0.7),
    SamplingParams(do_sample=True, top_k=1),
    SamplingParams(do_sample=True, top_k=5, temperature=1.3),
    SamplingParams(do_sample=True, top_k=V + 10),
    SamplingParams(do_sample=True, top_p=0.9),
    SamplingParams(do_sample=True, top_p=0.05),
    SamplingParams(do_sample=True, top_p=1.0),
    SamplingParams(do_sample=True, typical_p=0.5),
    SamplingParams(do_sample=True, typical_p=0.95, temperature=0.8),
    SamplingParams(do_sample=True, repetition_penalty=1.3),
    SamplingParams(do_sample=True, repetition_penalty=0.8, top_k=20, top_p=0.8, typical_p=0.9,
                   temperature=0.6),
    SamplingParams(repetition_penalty=1.5),
    SamplingParams(repetition_penalty=1.0),
]


@pytest.mark.parametrize("params", PARAMS, ids=repr)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processing_matches_transformers(params: SamplingParams, seed: int) -> None:
    logits = random_logits(seed)
    history = [3, 10, 11, 50, 50, 96, 5000]  # repeats, ties, and an id beyond the vocab
    expected = hf_processors(params)(torch.tensor([history]), logits.clone())[0]
    got = ours(logits[0], params, history)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("params", [p for p in PARAMS if p.do_sample], ids=repr)
def test_sampled_token_is_multinomial_of_transformers_distribution(params: SamplingParams) -> None:
    """Same seed, same stream: our token equals multinomial over HF's processed distribution."""
    history = [1, 2, 3]
    gen = torch.Generator().manual_seed(123)
    state = SamplingState.create(dataclasses.replace(params, seed=123))
    for step in range(10):
        logits = random_logits(100 + step)
        probs = hf_processors(params)(torch.tensor([history]), logits.clone()).softmax(-1)
        expected = torch.multinomial(probs[0], 1, generator=gen).item()
        (token,) = Sampler().sample(logits, [state], [history]).token_ids
        assert token == expected
        history.append(token)


def test_greedy_is_argmax_and_ignores_temperature() -> None:
    logits = random_logits(7, batch=6)
    states = [SamplingState.create(SamplingParams(temperature=t)) for t in (0.1, 0.5, 1.0, 2.0, 3.0, 9.0)]
    tokens, logprobs, _ = Sampler().sample(logits, states, [[]] * 6)
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs == [None] * 6
    assert all(s.generator is None for s in states)


def test_greedy_ties_go_to_the_lowest_id_as_argmax() -> None:
    """Rows of a real vocabulary's width whose maximum repeats (near both ends, everywhere, with NaN):
    the greedy token is argmax's, the first maximal id."""
    logits = torch.randn(5, 49152, generator=torch.Generator().manual_seed(3))
    logits[0, [7, 40000]] = 50.0
    logits[1, [30000, 49151]] = 50.0
    logits[2] = 1.0
    logits[3, [100, 20000]] = float("nan")
    logits[4, 0] = 50.0
    states = [SamplingState.create(SamplingParams()) for _ in range(5)]
    tokens = Sampler().sample(logits.clone(), states, [[]] * 5).token_ids
    assert tokens == logits.argmax(-1).tolist() == [7, 30000, 0, 100, 0]


def test_greedy_applies_repetition_penalty() -> None:
    logits = random_logits(8, batch=1)
    top = int(logits.argmax())
    state = SamplingState.create(SamplingParams(repetition_penalty=100.0))
    (token,) = Sampler().sample(logits, [state], [[top]]).token_ids
    expected = hf_processors(state.params)(torch.tensor([[top]]), logits.clone()).argmax(-1).item()
    assert token == expected != top


def test_seed_gives_same_tokens_whatever_the_batch() -> None:
    """One seeded row, alone and in two different mixes (greedy, other seeds, other params)."""
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1,
                            seed=42)
    others = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=1),
        SamplingParams(do_sample=True, typical_p=0.5, seed=2, logprobs=True),
        SamplingParams(do_sample=True),  # random seed
    ]
    step_logits = [random_logits(200 + s, batch=5) for s in range(25)]

    def run(mix: list[SamplingParams], position: int) -> list[int]:
        rows = mix[:position] + [params] + mix[position:]
        states = [SamplingState.create(p) for p in rows]
        histories: list[list[int]] = [[7, 8, 9] for _ in rows]
        for logits in step_logits:
            batch = logits[: len(rows)].clone()
            batch[position] = logits[0]  # the seeded row always sees the same logits
            tokens = Sampler().sample(batch, states, histories).token_ids
            for h, t in zip(histories, tokens, strict=True):
                h.append(t)
        return histories[position][3:]

    alone = run([], 0)
    assert len(set(alone)) > 3  # actually sampling, not stuck on one token
    assert run(others, 0) == alone
    assert run(others, 2) == alone
    assert run(others[::-1], 4) == alone


def test_random_seed_is_recorded_and_replays() -> None:
    first = SamplingState.create(SamplingParams(do_sample=True))
    assert isinstance(first.seed, int)
    replay = SamplingState.create(SamplingParams(do_sample=True, seed=first.seed))
    logits = random_logits(9)
    a = [Sampler().sample(logits, [first], [[]])[0][0] for _ in range(20)]
    b = [Sampler().sample(logits, [replay], [[]])[0][0] for _ in range(20)]
    assert a == b
    assert SamplingState.create(SamplingParams(seed=5)).seed == 5  # greedy keeps what was asked


def test_logprobs_after_penalty_and_temperature_before_filters() -> None:
    logits = random_logits(11, batch=3)
    rows = [
        SamplingParams(logprobs=True, repetition_penalty=1.2),
        SamplingParams(do_sample=True, temperature=0.5, top_k=3, seed=0, logprobs=True),
        SamplingParams(do_sample=True, seed=0),
    ]
    histories = [[1, 2], [1, 2], [1, 2]]
    before = logits.clone()
    tokens, logprobs, _ = Sampler().sample(logits, [SamplingState.create(p) for p in rows], histories)
    assert torch.equal(logits, before)  # input untouched
    penalized = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([[1, 2]]), logits[:1].clone())[0]
    assert logprobs[0] == pytest.approx(torch.log_softmax(penalized, -1)[tokens[0]].item(), abs=1e-6)
    assert logprobs[1] == pytest.approx(torch.log_softmax(logits[1] / 0.5, -1)[tokens[1]].item(), abs=1e-6)
    assert logprobs[2] is None


class LoraxFrequencyPenalty:
    """LoRAX's HeterogeneousFrequencyPenaltyLogitsProcessor.__call__ (server/lorax_server/utils/
    logits_process.py), verbatim but for its padding: the reference for one unpadded row."""

    def __init__(self, frequency_penalty: list[float], presence_penalty: list[float]) -> None:
        self.frequency_penalty_tensor = torch.tensor(frequency_penalty).unsqueeze(1)
        self.presence_penalty_tensor = torch.tensor(presence_penalty).unsqueeze(1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        batch_size, input_size = input_ids.size()
        vocab_size = scores.size(1)
        token_freq = torch.zeros(batch_size, vocab_size, device=input_ids.device)
        token_freq.scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=torch.float))
        mask = token_freq > 0
        token_freq /= input_size
        scores -= token_freq * self.frequency_penalty_tensor
        scores -= mask * self.presence_penalty_tensor
        return scores


@pytest.mark.parametrize("frequency,presence", [(0.5, 0.0), (0.0, 1.5), (-1.0, 2.0), (2.0, -2.0)])
def test_frequency_presence_penalties_match_loraxs_processor(frequency: float, presence: float) -> None:
    logits = random_logits(31)
    history = [3, 3, 3, 10, 11, 50, 96, 96]
    expected = LoraxFrequencyPenalty([frequency], [presence])(torch.tensor([history]), logits.clone())[0]
    got = logits[0].clone()
    apply_frequency_penalties(got, history, frequency, presence)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    state = SamplingState.create(SamplingParams(frequency_penalty=frequency, presence_penalty=presence))
    assert Sampler().sample(logits, [state], [history]).token_ids == [int(expected.argmax())]


def test_temperature_zero_and_the_lorax_rule() -> None:
    logits = random_logits(12, batch=4)
    rows = [SamplingParams(do_sample=True, temperature=0.0, top_k=3, seed=1),
            SamplingParams.lorax(temperature=0.0, top_p=0.5),
            SamplingParams.lorax(temperature=1.0), SamplingParams()]
    states = [SamplingState.create(p) for p in rows]
    assert all(s.generator is None for s in states)  # all greedy
    assert Sampler().sample(logits, states, [[]] * 4).token_ids == logits.argmax(-1).tolist()
    assert SamplingParams.lorax(top_k=3).do_sample and SamplingParams.lorax(typical_p=0.9).do_sample
    assert not SamplingParams.lorax(top_p=1.0, typical_p=1.0, temperature=1.0).do_sample


def test_alternatives_are_the_most_likely_ids_of_the_logprob_distribution() -> None:
    logits = random_logits(13, batch=2)
    rows = [SamplingParams(return_k_alternatives=5, repetition_penalty=1.3),
            SamplingParams(do_sample=True, temperature=0.5, seed=4, logprobs=True, return_k_alternatives=200)]
    sampled = Sampler().sample(logits, [SamplingState.create(p) for p in rows], [[10, 11], [1]])
    penalized = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[10, 11]]), logits[:1].clone())[0]
    logp = torch.log_softmax(penalized, -1)
    assert sampled.logprobs[0] is None  # alternatives without logprobs
    first = sampled.alternatives[0]
    assert [t for t, _ in first] == torch.sort(logp, descending=True, stable=True).indices[:5].tolist()
    assert [lp for _, lp in first] == pytest.approx(torch.sort(logp, descending=True).values[:5].tolist())
    assert first[0][0] == sampled.token_ids[0]  # greedy: the chosen token leads
    second = sampled.alternatives[1]
    assert len(second) == V  # k is capped at the vocabulary
    assert dict(second)[sampled.token_ids[1]] == pytest.approx(sampled.logprobs[1])
    # ties keep the lower id first (ids 9..13 hold one value)
    ties = [t for t, lp in second if lp == dict(second)[9]]
    assert ties == sorted(ties)

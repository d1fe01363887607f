"""Decode lanes (engine/decode_lanes.py): a runner reading decode rows' context from its lanes gives
the logits of one gathering it from the paged cache every layer, step by step, while rows join,
leave, change places, outgrow the lanes, sit out a step, and are recomputed after preemption."""

from __future__ import annotations

import pytest
import torch

from engine.decode_lanes import DecodeLanes
from engine.kv_cache import BlockManager, KVCache
from engine.model_runner import ModelRunner
from engine.request import GenerationRequest
from engine.sequence import Sequence


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Side:
    """A runner with its own cache and copies of the rows; `lanes` False: gathering every step."""

    def __init__(self, model, lanes: bool, kv_bytes: int = 1 << 20) -> None:
        cfg = model.hf_model.config
        self.cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                             4, kv_bytes, model.device, model.dtype)
        self.blocks = BlockManager(self.cache.num_blocks, 4)
        self.runner = ModelRunner(model, self.cache)
        if not lanes:
            self.runner.lanes = None
        self.seqs: dict[str, Sequence] = {}
        self.plans: list = []
        if self.runner.lanes is not None:
            plan = self.runner.lanes.plan

            def spy(rows):
                self.plans.append(plan(rows))
                return self.plans[-1]

            self.runner.lanes.plan = spy  # type: ignore[method-assign]

    def add(self, name: str, prompt: list[int]) -> None:
        seq = Sequence(GenerationRequest(id=name, prompt_token_ids=prompt), list(prompt), len(prompt))
        self.blocks.allocate(seq)
        self.seqs[name] = seq

    def step(self, names: list[str]) -> torch.Tensor:
        """Runs every uncomputed token of the named rows; the greedy token joins each row that reached its end."""
        rows = [self.seqs[n] for n in names]
        logits = self.runner.run(rows)
        for seq, row in zip(rows, logits, strict=True):
            seq.token_ids.append(int(row.argmax()))
            self.blocks.append(seq)
        return logits

    def preempt(self, name: str) -> None:
        self.blocks.deallocate(self.seqs[name])
        self.blocks.allocate(self.seqs[name])


@pytest.mark.parametrize("arch", ["llama", "mistral_sliding"])
def test_lanes_give_the_gathered_logits_whatever_the_rows_do(arch, loaded_models):
    model = loaded_models(arch)
    lanes, gather = Side(model, lanes=True), Side(model, lanes=False)
    assert lanes.runner.lanes is not None
    prompts = {"a": ids(5, 1), "b": ids(3, 2), "c": ids(7, 3), "d": ids(2, 4)}
    schedule = [
        ["a", "b"],            # prompts
        ["a", "b"],            # decode: lanes filled (new rows)
        ["a", "b"],            # steady: no fill
        ["b", "a"],            # places swapped: no fill, rows permuted
        ["c"],                 # a step without decode rows (c's prompt): every lane forgotten
        ["a", "b", "c"],       # all filled again
        ["a", "c"],            # b leaves: c moves into its lane
        ["d", "c", "a"],       # d's prompt beside decode rows (a mixed step)
        ["c", "a", "d"], ["c", "a", "d"], ["a", "d", "c"], ["d", "a", "c"],
        ["a", "d", "c"], ["a", "d", "c"], ["a", "d", "c"], ["a", "d", "c"],  # contexts past 16 and 32 tokens
        ["a", "d"],            # c preempted below: recomputed as a prompt beside them
        ["a", "d", "c"], ["a", "d", "c"],
    ]
    for name, prompt in prompts.items():
        lanes.add(name, prompt)
        gather.add(name, prompt)
    for k, names in enumerate(schedule):
        if k == 16:
            lanes.preempt("c")
            gather.preempt("c")
            names = [*names, "c"]
        torch.testing.assert_close(lanes.step(names), gather.step(names), atol=1e-6, rtol=0, msg=f"step {k}")
    assert [s.token_ids for s in lanes.seqs.values()] == [s.token_ids for s in gather.seqs.values()]

    assert None not in lanes.plans  # the 1 MiB cache holds every lane
    fills = [0 if p.fill is None else len(p.fill[0]) for p in lanes.plans]
    # plans: one per step with decode rows (not steps 0 and 4)
    assert fills[0] > 0 and fills[1] == 0 and fills[2] == 0  # filled once, then only new tokens are written
    assert lanes.plans[2].row_of_lane is not None  # the swap moved rows, not their lanes
    assert fills[3] > 0  # after the step without decode rows
    assert sum(f == 0 for f in fills) >= 8  # steady steps, lanes regrown at 16 and 32 tokens aside
    assert lanes.runner.lanes.k[0].shape[1] >= 32


def test_lanes_past_the_paged_cache_size_fall_back_to_gathering(loaded_models):
    """Lanes never hold more tokens than the paged cache: 6 lanes as long as the longest row (10
    blocks) would need 60 blocks of a 20-block cache, so the step gathers as before; the logits agree."""
    model = loaded_models("llama")
    per_block = Side(model, False).cache.bytes_per_block
    lanes, gather = Side(model, True, 20 * per_block), Side(model, False, 20 * per_block)
    names = [f"r{i}" for i in range(6)]
    for side in (lanes, gather):
        for i, name in enumerate(names):
            side.add(name, ids(37 if i == 0 else 2, 10 + i))
    for _ in range(3):
        torch.testing.assert_close(lanes.step(names), gather.step(names), atol=1e-6, rtol=0)
    assert lanes.plans and all(p is None for p in lanes.plans)
    assert lanes.runner.lanes is not None and lanes.runner.lanes.k == []  # nothing held


def test_a_failed_step_leaves_no_lane_claiming_what_it_did_not_write(loaded_models):
    """`plan` forgets the lanes a step will fill; only `commit`, after the forward, records them."""
    model = loaded_models("llama")
    side = Side(model, lanes=True)
    for name in ("a", "b"):
        side.add(name, ids(4, 20 if name == "a" else 21))
    side.step(["a", "b"])
    side.step(["a", "b"])
    held = side.runner.lanes
    assert isinstance(held, DecodeLanes)
    rows = [side.seqs["b"], side.seqs["a"]]
    plan = held.plan([side.seqs["a"]])  # a keeps lane 0; b's lane is past the row count: forgotten
    assert plan is not None and plan.fill is None
    again = held.plan(rows)  # that step never ran: b is filled again, a still held
    assert again is not None and again.fill is not None
    assert len(again.fill[0]) == -(-side.seqs["b"].num_tokens // 4)

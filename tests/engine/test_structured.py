"""Structured output (issue 13, point 2) on tiny random models: whatever the random weights prefer,
a constrained row's text parses and validates against its schema (jsonschema) or matches its regex,
on every architecture and adapter, greedy or sampled; free rows in the same steps produce exactly
the tokens they produce alone. Also: the grammar's masks (vocabulary padding, EOS only where the
grammar accepts), bad formats as validation errors, max_new_tokens too small, preemption, and the
masks filled on the grammar thread while the forward runs."""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path
from typing import Literal

import jsonschema
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.config import EngineConfig
from engine.engine import Engine
from engine.grammar import Grammar
from engine.request import (
    AdapterRef,
    Completion,
    EngineError,
    ErrorType,
    GenerationFailure,
    GenerationRequest,
    ResponseFormat,
    SamplingParams,
)
from tests.builders import ARCHS, make_adapter, make_tiny_model, make_tokenizer, run_requests

ARMOR = {"enum": ["leather", "chainmail", "plate"], "type": "string", "title": "Armor"}
CHARACTER = {
    "$defs": {"Armor": ARMOR},
    "title": "Character", "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10, "title": "Name"},
                   "age": {"type": "integer", "minimum": 1, "maximum": 99},
                   "armor": {"$ref": "#/$defs/Armor"},
                   "strength": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["name", "age", "armor", "strength"], "additionalProperties": False,
}


class Ticket(BaseModel):  # what a consumer's own model gives (pydantic's anyOf null, Literal, bounds)
    model_config = ConfigDict(extra="forbid")  # else any further property is valid: an unbounded text
    id: str = Field(pattern=r"^[A-Z]{2}-[0-9]{3}$")
    priority: Literal["low", "medium", "high"]
    tags: list[Literal["billing", "login", "delivery"]] = Field(max_length=3)
    escalate: bool | None
    score: int = Field(ge=-5, le=5)


# Every schema here bounds its texts (lengths, enums, integer ranges, no extra properties), so a
# constrained row must end, complete, within max_new_tokens whatever the weights say.
SCHEMAS = {
    "character": CHARACTER,
    "ticket": Ticket.model_json_schema(),
    "nested": {"type": "object", "additionalProperties": False, "required": ["ok", "items", "meta"],
               "properties": {"ok": {"type": "boolean"},
                              "items": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 0,
                                                                                    "maximum": 9}},
                              "meta": {"type": "object", "additionalProperties": False, "required": ["v"],
                                       "properties": {"v": {"const": "x1"}, "note": {"type": "null"}}}}},
    "label": {"enum": ["positive", "negative", "neutral"]},
    "either": {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["a"],
                          "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3}}},
                         {"type": "array", "maxItems": 2, "items": {"type": "boolean"}}]},
    "code": {"type": "string", "pattern": "^[a-f0-9]{8}$"},
}
REGEXES = {"yes_no": "(yes|no|maybe)", "phone": r"[0-9]{3}-[0-9]{4}", "word": "[a-z]{1,6}( [a-z]{1,6}){0,2}"}
MAX_NEW = 200  # above the longest text any SCHEMAS entry allows, in byte tokens


def constrained(rid: str, fmt: ResponseFormat, *, adapter: str | None = None, max_new: int = MAX_NEW,
                **params) -> GenerationRequest:
    return GenerationRequest(id=rid, prompt=f"request {rid}: answer in the format asked.", response_format=fmt,
                             adapter=AdapterRef(adapter) if adapter else None,
                             params=SamplingParams(max_new_tokens=max_new, **params))


def completion(outcome) -> Completion:
    assert isinstance(outcome, Completion), outcome
    return outcome


def assert_valid(outcome, schema: dict) -> dict:
    c = completion(outcome)
    assert c.finish_reason == "eos_token", (c.finish_reason, c.text)
    value = json.loads(c.text)
    jsonschema.validate(value, schema)
    return value


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tiny_model_dirs) -> Path:
    """Two adapters per architecture: <arch>/a1 (q, v) and <arch>/a2 (every module)."""
    root = tmp_path_factory.mktemp("structured-adapters")
    for arch in ARCHS:
        make_adapter(tiny_model_dirs[arch], root / arch / "a1", r=4, seed=11)
        make_adapter(tiny_model_dirs[arch], root / arch / "a2", r=8, seed=12,
                     targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return root


# ---- the grammar alone -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))  # 256 byte tokens + 3 specials; EOS is id 2


def allowed_ids(grammar: Grammar, matchers) -> list[set[int]]:
    future = grammar.fill(matchers)
    assert future is not None
    bias = grammar.bias(future.result())
    assert set(bias.unique().tolist()) <= {0.0, float("-inf")}
    return [set((row == 0).nonzero().flatten().tolist()) for row in bias]


def byte_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_masks_cover_padded_logits_and_allow_eos_only_where_the_grammar_accepts(tokenizer):
    grammar = Grammar(tokenizer, vocab_size=320, eos_token_ids={2}, device=torch.device("cpu"))  # logits padded
    try:
        matcher = grammar.matcher(ResponseFormat("regex", "(yes|no)"))
        assert grammar.fill([None, None]) is None  # no constrained row: nothing to fill
        first, free = allowed_ids(grammar, [matcher, None])
        assert free == set(range(320))  # a free row keeps every logit, padding included
        assert first == set(byte_ids(tokenizer, "y") + byte_ids(tokenizer, "n"))  # no EOS, no padding id
        for token in byte_ids(tokenizer, "ye"):
            assert matcher.advance(token) is False
        assert allowed_ids(grammar, [matcher])[0] == set(byte_ids(tokenizer, "s"))  # not accepting: no EOS
        assert matcher.advance(byte_ids(tokenizer, "s")[0]) is True  # complete: nothing but EOS may follow
        assert allowed_ids(grammar, [matcher])[0] == {2}
    finally:
        grammar.close()


def test_masks_are_cut_to_logits_narrower_than_the_tokenizer(tokenizer):
    grammar = Grammar(tokenizer, vocab_size=200, eos_token_ids={2}, device=torch.device("cpu"))
    try:
        matcher = grammar.matcher(ResponseFormat("regex", "[a-z]+"))
        future = grammar.fill([matcher])
        assert future is not None
        assert grammar.bias(future.result()).shape == (1, 200)
    finally:
        grammar.close()


def test_matchers_of_one_format_are_independent_and_compiled_once(tokenizer):
    grammar = Grammar(tokenizer, vocab_size=259, eos_token_ids={2}, device=torch.device("cpu"))
    try:
        fmt = ResponseFormat.json_schema(SCHEMAS["label"])
        a, b = grammar.matcher(fmt), grammar.matcher(ResponseFormat.json_schema(SCHEMAS["label"]))
        assert len(grammar._templates) == 1
        for token in byte_ids(tokenizer, '"neg'):
            a.advance(token)
        assert allowed_ids(grammar, [a, b]) == [set(byte_ids(tokenizer, "a")), set(byte_ids(tokenizer, '"'))]
    finally:
        grammar.close()


@pytest.mark.parametrize(("fmt", "message"), [
    (ResponseFormat.json_schema({"type": "strng"}), "Invalid type: strng"),
    (ResponseFormat.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/Nope"}}}), "Nope"),
    (ResponseFormat.json_schema({"not": {"type": "string"}}), "not"),  # cannot be enforced: refused, not ignored
    (ResponseFormat.json_schema({"type": "integer", "minimum": 5, "maximum": 1}), "Unsatisfiable"),
    (ResponseFormat.json_schema({"type": "string", "format": "no-such-format"}), "no-such-format"),
    (ResponseFormat("regex", "(unclosed"), "unclosed"),
    (ResponseFormat("json_schema", "[1, 2]"), "response_format"),  # JSON, but not a schema
])
def test_formats_that_cannot_be_enforced_are_validation_errors(tokenizer, fmt, message):
    grammar = Grammar(tokenizer, vocab_size=259, eos_token_ids={2}, device=torch.device("cpu"))
    try:
        with pytest.raises(EngineError) as raised:
            grammar.matcher(fmt)
        assert raised.value.type is ErrorType.VALIDATION and not raised.value.retryable
        assert raised.value.message.startswith("parameters.response_format") and message in raised.value.message
    finally:
        grammar.close()


def test_a_slow_tokenizer_refuses_constrained_jobs_only():
    class SlowTokenizer:  # a Python tokenizer: no Rust backend for llguidance to read
        def __len__(self) -> int:
            return 300

    grammar = Grammar(SlowTokenizer(), vocab_size=300, eos_token_ids={2}, device=torch.device("cpu"))
    try:
        assert grammar.fill([None]) is None
        with pytest.raises(EngineError, match="needs a fast tokenizer") as raised:
            grammar.matcher(ResponseFormat("regex", "a"))
        assert raised.value.type is ErrorType.VALIDATION
    finally:
        grammar.close()


# ---- through the engine ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_random_weights_follow_every_schema_and_free_rows_are_untouched(arch, tiny_model_dirs, loaded_models,
                                                                         adapter_root):
    engine = Engine(EngineConfig(model=str(tiny_model_dirs[arch]), adapter_root=str(adapter_root / arch),
                                 max_batch=32), model=loaded_models(arch))
    try:
        adapters = [None, "a1", "a2"]
        requests, expect = [], {}
        for k, (name, schema) in enumerate(SCHEMAS.items()):
            fmt = ResponseFormat.json_schema(schema)
            requests.append(constrained(f"{name}-greedy", fmt, adapter=adapters[k % 3]))
            requests.append(constrained(f"{name}-sampled", fmt, adapter=adapters[(k + 1) % 3], do_sample=True,
                                        temperature=1.5, seed=k))
            expect[f"{name}-greedy"] = expect[f"{name}-sampled"] = schema
        for k, (name, pattern) in enumerate(REGEXES.items()):
            requests.append(constrained(f"re-{name}", ResponseFormat("regex", pattern), adapter=adapters[k % 3]))
        free = [GenerationRequest(id=f"free-{k}", prompt=f"free row {k}", adapter=AdapterRef(a) if a else None,
                                  params=SamplingParams(max_new_tokens=24 + k)) for k, a in enumerate(adapters * 2)]
        mixed = run_requests(engine, [*requests, *free], timeout=300)

        for rid, schema in expect.items():
            assert_valid(mixed[rid], schema)
        for name, pattern in REGEXES.items():
            c = completion(mixed[f"re-{name}"])
            assert c.finish_reason == "eos_token" and re.fullmatch(pattern, c.text), c.text
        outputs = {r.id: completion(mixed[r.id]).text for r in requests}
        assert len(set(outputs.values())) > len(outputs) // 2  # the weights (and adapters) still choose

        alone = run_requests(engine, [GenerationRequest(id=r.id, prompt=r.prompt, adapter=r.adapter, params=r.params)
                                      for r in free])
        for r in free:
            assert completion(mixed[r.id]).token_ids == completion(alone[r.id]).token_ids, r.id
    finally:
        engine.shutdown(10)


def test_too_few_new_tokens_finish_with_length_and_an_unfinished_text(make_engine):
    engine = make_engine("llama")
    fmt = ResponseFormat.json_schema(CHARACTER)
    outcomes = run_requests(engine, [constrained("short", fmt, max_new=6),
                                     constrained("enough", fmt, max_new=MAX_NEW)])
    short = completion(outcomes["short"])
    assert short.finish_reason == "length" and short.generated_tokens == 6
    assert short.text == '{"name'  # the only way a Character can start, cut where the tokens ran out
    with pytest.raises(ValueError):
        json.loads(short.text)
    assert_valid(outcomes["enough"], CHARACTER)


def test_unbounded_schema_ends_valid_or_with_length(make_engine):
    """LoRAX's default schema (any object) does not bound the text: each row is either complete and
    valid (eos_token) or cut off (length), never complete-looking but invalid."""
    from consumer.protocol import DEFAULT_JSON_SCHEMA

    engine = make_engine("qwen2")
    fmt = ResponseFormat.json_schema(DEFAULT_JSON_SCHEMA)
    outcomes = run_requests(engine, [constrained(f"any-{k}", fmt, max_new=80, do_sample=True, seed=k)
                                     for k in range(6)], timeout=120)
    for outcome in outcomes.values():
        c = completion(outcome)
        if c.finish_reason == "eos_token":
            jsonschema.validate(json.loads(c.text), DEFAULT_JSON_SCHEMA)
        else:
            assert c.finish_reason == "length" and c.generated_tokens == 80


def test_bad_format_fails_its_request_alone(make_engine):
    engine = make_engine("llama")
    outcomes = run_requests(engine, [
        constrained("bad", ResponseFormat.json_schema({"type": "object", "properties": {"a": {"type": "nope"}}})),
        constrained("good", ResponseFormat("regex", "(yes|no)")),
        GenerationRequest(id="free", prompt="hello", params=SamplingParams(max_new_tokens=5)),
    ])
    bad = outcomes["bad"]
    assert isinstance(bad, GenerationFailure) and bad.error.type is ErrorType.VALIDATION
    assert "Invalid type: nope" in bad.error.message
    assert completion(outcomes["good"]).text in ("yes", "no")
    assert completion(outcomes["free"]).generated_tokens >= 1


def test_eos_is_masked_until_the_grammar_accepts(make_engine):
    """With the EOS logit far above every other, a free row ends at once; a constrained one still
    writes its whole object, and ends as soon as the grammar is complete, even with ignore_eos."""
    engine = make_engine("mistral")
    run = engine.runner.run

    def eos_first(seqs, prefill):
        logits = run(seqs, prefill).clone()
        logits[:, 2] += 1e4
        return logits

    engine.runner.run = eos_first
    fmt = ResponseFormat.json_schema(CHARACTER)
    outcomes = run_requests(engine, [
        GenerationRequest(id="free", prompt="hi", params=SamplingParams(max_new_tokens=20)),
        constrained("json", fmt), constrained("json-ignore-eos", fmt, ignore_eos=True),
    ])
    free = completion(outcomes["free"])
    assert free.finish_reason == "eos_token" and free.generated_tokens == 1
    for rid in ("json", "json-ignore-eos"):
        assert_valid(outcomes[rid], CHARACTER)
        assert completion(outcomes[rid]).token_ids[-1] != 2  # the object's last byte ended it: no EOS step


def test_logprobs_and_alternatives_of_constrained_rows_are_of_the_masked_distribution(make_engine):
    engine = make_engine("llama")
    outcomes = run_requests(engine, [constrained("alt", ResponseFormat("regex", "(yes|no)"), logprobs=True,
                                                 return_k_alternatives=5)])
    c = completion(outcomes["alt"])
    assert c.text in ("yes", "no") and len(c.tokens) == 3
    first, *rest = c.tokens
    assert {a.token_id for a in first.alternatives} == set(byte_ids(engine.tokenizer, "yn"))
    assert sum(math.exp(a.logprob) for a in first.alternatives) == pytest.approx(1.0)  # y and n share it all
    for token in rest:  # one byte possible: probability 1, no masked token listed as an alternative
        assert token.logprob == pytest.approx(0.0) and [a.token_id for a in token.alternatives] == [token.token_id]


def test_padded_vocabulary_is_never_sampled_by_constrained_rows(tmp_path):
    """lm_head wider than the tokenizer (vocabularies padded to a multiple of 64): the padding ids
    get the largest logits here, yet constrained rows never choose them."""
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.resize_token_embeddings(320, mean_resizing=False)
    with torch.no_grad():
        hf.lm_head.weight[259:] = hf.lm_head.weight[3:64] * 50  # padding rows dominate every logit
    hf.save_pretrained(model_dir)
    engine = Engine(EngineConfig(model=str(model_dir)))
    try:
        assert engine.runner.lm_head.out_features == 320 and len(engine.tokenizer) == 259
        outcomes = run_requests(engine, [constrained("json", ResponseFormat.json_schema(CHARACTER)),
                                         GenerationRequest(id="free", prompt="hi", params=SamplingParams(6))])
        json_row = completion(outcomes["json"])
        assert_valid(json_row, CHARACTER)
        assert max(json_row.token_ids) < 259
        assert max(completion(outcomes["free"]).token_ids) >= 259  # the free row does pick padding ids
    finally:
        engine.shutdown(10)


def test_preempted_constrained_rows_resume_their_grammar(make_engine):
    engine = make_engine("llama", kv_block_size=4, kv_cache_bytes=64 * 1024)  # 32 blocks of 4 tokens
    fmt = ResponseFormat.json_schema(SCHEMAS["nested"])
    outcomes = run_requests(engine, [constrained(f"row-{k}", fmt, max_new=100) for k in range(5)], timeout=120)
    assert engine.stats()["preemptions"] > 0
    for outcome in outcomes.values():
        assert_valid(outcome, SCHEMAS["nested"])


def test_masks_are_filled_on_the_grammar_thread_while_the_forward_runs(make_engine):
    """The fill waits until the forward has begun: were it done on the step thread before the
    forward, the step would never start. No timing involved."""
    engine = make_engine("llama")
    forward_began = threading.Event()
    fill_threads: list[str] = []
    run, fill = engine.runner.run, engine.grammar._fill

    def forward(seqs, prefill):
        forward_began.set()
        return run(seqs, prefill)

    def fill_after_the_forward_began(rows, bitmask):
        assert forward_began.wait(10), "the forward never began: masks were awaited first"
        forward_began.clear()
        fill_threads.append(threading.current_thread().name)
        return fill(rows, bitmask)

    engine.runner.run = forward
    engine.grammar._fill = fill_after_the_forward_began
    outcomes = run_requests(engine, [constrained("json", ResponseFormat.json_schema(CHARACTER)),
                                     GenerationRequest(id="free", prompt="x", params=SamplingParams(8))])
    assert_valid(outcomes["json"], CHARACTER)
    assert len(fill_threads) == completion(outcomes["json"]).generated_tokens
    assert {name.split("_")[0] for name in fill_threads} == {"loraq-grammar"}

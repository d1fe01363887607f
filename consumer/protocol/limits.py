"""Limits: the size limits a worker puts on hostile input."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Limits:
    """Size limits on hostile input; a job over any of them is rejected before the model sees it."""

    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 200_000  # inputs, or the sum of message contents
    max_messages: int = 512
    max_new_tokens: int = 4096
    max_stop_sequences: int = 8
    max_stop_length: int = 256
    max_adapter_id_length: int = 256
    max_id_length: int = 256  # message_id / correlation_id

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be >= 1")

    @classmethod
    def unbounded(cls) -> Limits:
        """Type checks only: what a client validates before publishing (the worker's limits rule)."""
        big = 2**62
        return cls(**{f.name: big for f in fields(cls)})

"""ProtocolError and the `error_type` values: what every bad job or reply is answered with."""

from __future__ import annotations

from engine.request import ErrorType

# error_type values: the engine's ErrorType (engine.request imports no torch, like this package)
VALIDATION = ErrorType.VALIDATION.value
ADAPTER_NOT_FOUND = ErrorType.ADAPTER_NOT_FOUND.value
ADAPTER_INVALID = ErrorType.ADAPTER_INVALID.value
PROMPT_TOO_LONG = ErrorType.PROMPT_TOO_LONG.value
DEADLINE_EXCEEDED = ErrorType.DEADLINE_EXCEEDED.value
OVERLOADED = ErrorType.OVERLOADED.value
INTERNAL = ErrorType.INTERNAL.value
ERROR_TYPES = tuple(e.value for e in ErrorType)


class ProtocolError(Exception):
    """A job or reply that breaks the contract. `error_type` is one of `ERROR_TYPES`."""

    def __init__(self, error_type: str, message: str, retryable: bool = False) -> None:
        if error_type not in ERROR_TYPES:
            raise ValueError(f"unknown error_type {error_type!r}; one of {ERROR_TYPES}")
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retryable = retryable


def _fail(message: str, error_type: str = VALIDATION) -> ProtocolError:
    return ProtocolError(error_type, message)

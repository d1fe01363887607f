"""The base model's chat template: a job's `messages` rendered into its prompt text.

transformers renders the template (jinja2). The template alone decides which roles it renders and
in what order: many raise on a system message, or on roles that do not alternate user / assistant.
What it refuses is the job's fault, so it is a `validation` error that names the problem (the
template's own message and the roles sent), never an internal one.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from engine.request import EngineError, ErrorType

MAX_ROLES_SHOWN = 16  # roles an error message lists


def render_chat(tokenizer: Any, messages: list[dict]) -> str:
    """The prompt text of `messages` ({role, content} strings), with the assistant's turn opened
    (`add_generation_prompt`). Raises EngineError(VALIDATION) for a chat the template cannot render
    or a model without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise EngineError(ErrorType.VALIDATION,
                          "messages: the model has no chat template; send the prompt as inputs")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:  # raise_exception(...) in the template, or an error in rendering it
        roles = ", ".join(str(m.get("role")) for m in messages[:MAX_ROLES_SHOWN])
        roles += ", ..." if len(messages) > MAX_ROLES_SHOWN else ""
        raise EngineError(ErrorType.VALIDATION,
                          f"messages (roles: {roles}): the model's chat template cannot render them: "
                          f"{str(e) or type(e).__name__}") from e
    if not isinstance(text, str):
        raise EngineError(ErrorType.VALIDATION, "messages: the model's chat template did not render text")
    return text

"""How a prompt reads as text outside the policy: to the reward model, in preference records,
to an annotator. One rule, so that the same question is the same string wherever it appears
(a ranking posted as plain text, a rollout's chat prompt, a chat completion's thumbs):

- a plain-text prompt is used as it is;
- a conversation of one user turn is that turn's content (what a person asked);
- any other conversation is one "role: content" line per message, in order (e.g.
  "system: Be brief.\\nuser: Hi").

None of it depends on the policy's tokenizer or chat template, so the data outlives the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.rpc import FieldError
from services.genproto.rlhf.v1 import common_pb2

ROLES = ("system", "user", "assistant")
"""The chat roles a scoring service (reward, judge) reads."""


def render_messages(messages: Sequence[tuple[str, str]]) -> str:
    """[(role, content), ...] -> the prompt text (see the module docstring)."""
    if len(messages) == 1 and messages[0][0] == "user":
        return messages[0][1]
    return "\n".join(f"{role}: {content}" for role, content in messages)


def render_prompt(prompt: common_pb2.Prompt) -> str:
    """The text of a wire prompt (plain text or chat messages)."""
    if prompt.WhichOneof("kind") == "messages":
        return render_messages([(m.role, m.content) for m in prompt.messages.messages])
    return prompt.text


def checked_prompt_text(prompt: common_pb2.Prompt, where: str) -> str:
    """The text of a request's prompt (render_prompt), after its chat messages are checked:
    at least one, each of ROLES; FieldError names `<where>.prompt...` otherwise. An empty text
    is the caller's to judge (its message differs by what the prompt is for)."""
    if prompt.WhichOneof("kind") == "messages":
        if not prompt.messages.messages:
            raise FieldError(f"{where}.prompt.messages", "empty prompt: no messages")
        for j, message in enumerate(prompt.messages.messages):
            if message.role not in ROLES:
                raise FieldError(
                    f"{where}.prompt.messages[{j}].role",
                    f"{message.role!r} is not one of {ROLES}",
                )
    return render_prompt(prompt)

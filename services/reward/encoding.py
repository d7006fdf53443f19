"""What the reward model reads: a prompt rendered as text, then the (prompt, response) encoding.

- A plain-text prompt is used as it is.
- A chat prompt is rendered as one "role: content" line per message, in order (e.g.
  "system: Be brief.\\nuser: Hi"). The reward model is a text-pair encoder with no chat template
  of its own, and this rendering does not depend on the policy's tokenizer, so the same
  conversation always scores the same whatever policy produced it.
- The pair encoding is the reward-model trainer's own `encode_for_reward` /`reward_batch`
  (services.trainer.offline.encoding): serving and training see identical tokens, truncation
  (longest first, to `max_length` tokens) included.
"""

from __future__ import annotations

from services.genproto.rlhf.v1 import common_pb2
from services.trainer.offline.encoding import encode_for_reward, reward_batch

__all__ = ["encode_for_reward", "render_messages", "render_prompt", "reward_batch"]


def render_messages(messages: list[tuple[str, str]]) -> str:
    """[(role, content), ...] -> "role: content" lines."""
    return "\n".join(f"{role}: {content}" for role, content in messages)


def render_prompt(prompt: common_pb2.Prompt) -> str:
    """The text the reward model sees for a wire prompt (plain text or chat messages)."""
    if prompt.WhichOneof("kind") == "messages":
        return render_messages([(m.role, m.content) for m in prompt.messages.messages])
    return prompt.text

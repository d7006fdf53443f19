"""Request checks and conversion to engine types, in one place: a Generate request becomes a
`GenerationPlan` (tokenized prompts, normalised sampling) or an `InvalidArgument` naming the
field (the servicer turns it into gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from services.genproto.rlhf.v1 import common_pb2, policy_pb2
from services.policy.engine import SequenceRequest

ROLES = ("system", "user", "assistant")
MAX_TOP_LOGPROBS = 20
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 1024


class InvalidArgument(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    """Bounds from settings and the model."""

    served_name: str
    max_prompts: int
    max_n: int
    max_sequences: int
    max_total_tokens: int
    """min(configured cap, model context)."""
    default_max_new_tokens: int
    max_stop_strings: int
    vocab_size: int = 2**32
    """Token ids below this exist (logit_bias keys are checked against it)."""


@dataclass(frozen=True)
class PlannedPrompt:
    prompt: common_pb2.Prompt
    prompt_text: str
    """As the model sees it (chat template applied)."""
    prompt_ids: list[int]


@dataclass(frozen=True)
class SamplingPlan:
    """SamplingParams after defaults and checks."""

    n: int
    max_new_tokens: int
    top_p: float
    logit_bias: dict[int, float]


@dataclass(frozen=True)
class GenerationPlan:
    prompts: list[PlannedPrompt]
    n: int
    sequences: list[SequenceRequest]
    """len(prompts) * n, prompt-major: sequence k is sample k % n of prompt k // n."""
    token_logprobs: bool = False
    """Samples carry PositionLogprobs (asked with token_logprobs or top_logprobs)."""


def render_prompt(prompt: common_pb2.Prompt, tokenizer, field: str) -> tuple[str, list[int]]:
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        if not prompt.text.strip():
            raise InvalidArgument(field, "empty prompt")
        return prompt.text, tokenizer(prompt.text)["input_ids"]
    if kind == "messages":
        messages = prompt.messages.messages
        if not messages:
            raise InvalidArgument(field, "empty prompt (no messages)")
        for j, m in enumerate(messages):
            if m.role not in ROLES:
                raise InvalidArgument(
                    f"{field}.messages[{j}].role", f"must be one of {ROLES}, got {m.role!r}"
                )
            if not m.content.strip():
                raise InvalidArgument(f"{field}.messages[{j}].content", "empty message")
        chat = [{"role": m.role, "content": m.content} for m in messages]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]
    raise InvalidArgument(field, "empty prompt (neither text nor messages)")


def _finite_within(value: float, bound: float) -> bool:
    return math.isfinite(value) and -bound <= value <= bound


def check_sampling(s: policy_pb2.SamplingParams, prompts: int, limits: Limits) -> SamplingPlan:
    """The sampling parameters after the proto's documented defaults (n 0 means 1, top_p 0
    means 1, max_new_tokens 0 means the server's default), or InvalidArgument."""
    n = s.n or 1
    if n > limits.max_n:
        raise InvalidArgument("sampling.n", f"{n} is more than the limit of {limits.max_n}")
    if prompts * n > limits.max_sequences:
        raise InvalidArgument(
            "sampling.n",
            f"{prompts} prompts x n={n} is more than {limits.max_sequences} sequences",
        )
    if math.isnan(s.temperature) or s.temperature < 0:
        raise InvalidArgument("sampling.temperature", f"must be >= 0, got {s.temperature}")
    top_p = 1.0 if s.top_p == 0 else s.top_p
    if math.isnan(top_p) or not 0 < top_p <= 1:
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    max_new = s.max_new_tokens or limits.default_max_new_tokens
    if max_new >= limits.max_total_tokens:
        raise InvalidArgument(
            "sampling.max_new_tokens",
            f"{max_new} leaves no room in {limits.max_total_tokens} tokens",
        )
    if len(s.stop) > limits.max_stop_strings:
        raise InvalidArgument(
            "sampling.stop", f"{len(s.stop)} stop strings, the limit is {limits.max_stop_strings}"
        )
    if any(not x for x in s.stop):
        raise InvalidArgument("sampling.stop", "empty stop string")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not _finite_within(value, MAX_PENALTY):
            raise InvalidArgument(
                f"sampling.{name}", f"must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}"
            )
    if s.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(
            "sampling.top_logprobs", f"must be at most {MAX_TOP_LOGPROBS}, got {s.top_logprobs}"
        )
    if len(s.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
        raise InvalidArgument(
            "sampling.logit_bias",
            f"{len(s.logit_bias)} tokens, the limit is {MAX_LOGIT_BIAS_TOKENS}",
        )
    for token, bias in s.logit_bias.items():
        if token >= limits.vocab_size:
            raise InvalidArgument(
                "sampling.logit_bias",
                f"token id {token} is not in the vocabulary (ids 0 to {limits.vocab_size - 1})",
            )
        if not _finite_within(bias, MAX_LOGIT_BIAS):
            raise InvalidArgument(
                "sampling.logit_bias",
                f"bias of token {token} must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                f"got {bias}",
            )
    return SamplingPlan(n, max_new, top_p, {int(t): float(b) for t, b in s.logit_bias.items()})


def plan_generation(
    model: str,
    prompts: list[common_pb2.Prompt],
    sampling: policy_pb2.SamplingParams,
    tokenizer,
    limits: Limits,
    stream: bool = False,
    prompt_field: str = "prompts",
) -> GenerationPlan:
    if model and model != limits.served_name:
        raise InvalidArgument(
            "model", f"unknown model {model!r}; this service serves {limits.served_name!r}"
        )
    if not prompts:
        raise InvalidArgument(prompt_field, "at least one prompt is required")
    if len(prompts) > limits.max_prompts:
        raise InvalidArgument(
            prompt_field, f"{len(prompts)} prompts, the limit is {limits.max_prompts}"
        )
    checked = check_sampling(sampling, len(prompts), limits)
    n, max_new = checked.n, checked.max_new_tokens
    seed = sampling.seed if sampling.has_seed else secrets.randbits(63)
    planned, sequences = [], []
    for i, prompt in enumerate(prompts):
        field = f"{prompt_field}[{i}]" if not stream else prompt_field
        text, ids = render_prompt(prompt, tokenizer, field)
        if not ids:
            raise InvalidArgument(field, "empty prompt (no tokens)")
        if len(ids) + max_new > limits.max_total_tokens:
            raise InvalidArgument(
                field,
                f"too many tokens: {len(ids)} prompt + {max_new} new > limit {limits.max_total_tokens}",
            )
        planned.append(PlannedPrompt(prompt, text, ids))
        for j in range(n):
            sequences.append(
                SequenceRequest(
                    prompt_ids=ids,
                    max_new_tokens=max_new,
                    temperature=float(sampling.temperature),
                    top_p=float(checked.top_p),
                    top_k=int(sampling.top_k),
                    seed=seed + i * n + j,
                    stop=list(sampling.stop),
                    stream=stream,
                    presence_penalty=float(sampling.presence_penalty),
                    frequency_penalty=float(sampling.frequency_penalty),
                    logit_bias=checked.logit_bias,
                    top_logprobs=int(sampling.top_logprobs),
                )
            )
    token_logprobs = sampling.token_logprobs or sampling.top_logprobs > 0
    return GenerationPlan(planned, n, sequences, token_logprobs)

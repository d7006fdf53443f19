"""Wire schemas of the OpenAI-compatible routes (`/v1/chat/completions`, `/v1/completions`,
`/v1/models`), pydantic, strict.

Every field of OpenAI's request schemas is accepted, with bounds, and unknown fields are refused
(400 naming the field). What a field does here is one of three things, documented per field in
docs/openai-compatibility.md:

- honoured: converted to the policy's SamplingParams in `serving.sampling_params`;
- ignored (it only concerns OpenAI's hosting): `ignored()` names it, the request logs a warning;
- refused (the policy cannot do it): `refusals()` names it, the request is a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT = 32_000
"""Characters in one prompt, message or content part."""

MAX_N = 16
MAX_STOP = 4
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20
MAX_LEGACY_LOGPROBS = 5

Text = Annotated[str, Field(max_length=MAX_TEXT)]
StopString = Annotated[str, Field(min_length=1, max_length=64)]
TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$", description="A token id, in decimal.")]
Bias = Annotated[float, Field(ge=-100, le=100)]
Loose = dict[str, Any]
"""An object of OpenAI's schema that this gateway only checks for presence (ignored or refused)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----- messages -----


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class RefusalPart(Strict):
    type: Literal["refusal"]
    refusal: Text


class UnsupportedPart(BaseModel):
    """Image, audio and file inputs: accepted by the schema, refused (the policy reads text)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file"]


UserPart = Annotated[TextPart | UnsupportedPart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]
Name = Annotated[str | None, Field(max_length=64, description="Ignored.")]


class SystemMessage(Strict):
    role: Literal["system"]
    content: Text | Annotated[list[TextPart], Field(max_length=64)]
    name: Name = None


class DeveloperMessage(Strict):
    role: Literal["developer"] = Field(description="Rendered as a system message.")
    content: Text | Annotated[list[TextPart], Field(max_length=64)]
    name: Name = None


class UserMessage(Strict):
    role: Literal["user"]
    content: Text | Annotated[list[UserPart], Field(max_length=64)]
    name: Name = None


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: Text | Annotated[list[AssistantPart], Field(max_length=64)] | None = None
    name: Name = None
    refusal: Text | None = None
    tool_calls: list[Loose] | None = Field(None, max_length=128, description="Refused.")
    function_call: Loose | None = Field(None, description="Refused.")
    audio: Loose | None = Field(None, description="Refused.")


class ToolMessage(Strict):
    role: Literal["tool"] = Field(description="Refused: the policy has no tool calling.")
    content: Text | Annotated[list[TextPart], Field(max_length=64)]
    tool_call_id: str = Field(max_length=256)


class FunctionMessage(Strict):
    role: Literal["function"] = Field(description="Refused: the policy has no function calling.")
    content: Text | None
    name: str = Field(max_length=64)


ChatMessage = Annotated[
    SystemMessage
    | DeveloperMessage
    | UserMessage
    | AssistantMessage
    | ToolMessage
    | FunctionMessage,
    Field(discriminator="role"),
]


# ----- requests -----


class StreamOptions(Strict):
    include_usage: bool | None = Field(
        None, description="Send a last chunk with `usage` and no choices before `[DONE]`."
    )
    include_obfuscation: bool | None = Field(None, description="Ignored (never obfuscated).")


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="`text` only; the others are refused."
    )
    json_schema: Loose | None = None


class SamplingFields(Strict):
    """The sampling fields both endpoints share."""

    model: str = Field(
        "policy",
        min_length=1,
        max_length=128,
        description="A name /v1/models lists, or the alias `policy`.",
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int | None = Field(None, ge=1, le=MAX_N, description="Choices to generate.")
    stream: bool | None = Field(False, description="Send server-sent events.")
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = Field(
        None, description="Up to 4 stop strings; the text ends before the first one."
    )
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="Same seed, same text.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[TokenId, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = Field(
        None, description="Token id -> bias added to its logit, -100 to 100."
    )
    user: str | None = Field(None, max_length=256, description="End-user id; logged.")

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def refusals(self) -> list[tuple[str, str]]:
        """(param, why) for every field whose value the policy cannot honour."""
        if self.stream_options is not None and not self.stream:
            return [("stream_options", "`stream_options` is only allowed when `stream` is true")]
        return []

    def ignored(self) -> list[str]:
        """Fields given that only concern OpenAI's hosting."""
        options = self.stream_options
        return (
            ["stream_options.include_obfuscation"]
            if options and options.include_obfuscation is not None
            else []
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=64, description="The chat.")
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="Bound on new tokens.")
    max_completion_tokens: int | None = Field(
        None, ge=1, le=2**31 - 1, description="Bound on new tokens; wins over `max_tokens`."
    )
    logprobs: bool | None = Field(None, description="Return each token's log-prob.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per position (needs logprobs)."
    )
    response_format: ResponseFormat | None = None
    tools: list[Loose] | None = Field(None, max_length=128, description="Refused when not empty.")
    tool_choice: Literal["none", "auto", "required"] | Loose | None = None
    parallel_tool_calls: bool | None = Field(None, description="Ignored (no tools).")
    functions: list[Loose] | None = Field(None, max_length=128, description="Refused if any.")
    function_call: Literal["none", "auto"] | Loose | None = None
    modalities: list[Literal["text", "audio"]] | None = Field(None, max_length=2)
    audio: Loose | None = Field(None, description="Refused.")
    prediction: Loose | None = Field(None, description="Ignored.")
    web_search_options: Loose | None = Field(None, description="Refused.")
    moderation: Loose | None = Field(None, description="Refused (no moderation runs here).")
    reasoning_effort: str | None = Field(None, max_length=32, description="Ignored.")
    verbosity: str | None = Field(None, max_length=32, description="Ignored.")
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=16),
        ]
        | None
    ) = Field(None, description="Ignored.")
    store: bool | None = Field(None, description="Ignored: every generation is logged to Kafka.")
    service_tier: str | None = Field(None, max_length=32, description="Ignored.")
    prompt_cache_key: str | None = Field(None, max_length=1024, description="Ignored.")
    prompt_cache_retention: str | None = Field(None, max_length=32, description="Ignored.")
    prompt_cache_options: Loose | None = Field(None, description="Ignored.")
    safety_identifier: str | None = Field(None, max_length=256, description="Ignored.")
    best_of: int | None = Field(
        None,
        ge=1,
        le=MAX_N,
        description="Extension (OpenAI has it on legacy completions only): sample this many "
        "answers (>= n) and return the n of highest reward, best first, each with its `reward`. "
        "Needs the gateway's reward service; not with `stream` when above n.",
    )

    @property
    def max_new_tokens(self) -> tuple[str, int | None]:
        """(the field that bounds the length, its value)."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def refusals(self) -> list[tuple[str, str]]:
        found = super().refusals()
        for i, message in enumerate(self.messages):
            found += message_refusals(f"messages[{i}]", message)
        if self.top_logprobs is not None and not self.logprobs:
            found.append(("top_logprobs", "`top_logprobs` needs `logprobs` set to true"))
        if self.best_of is not None and self.best_of < (self.n or 1):
            found.append(("best_of", "`best_of` must be at least `n`"))
        elif self.best_of is not None and self.best_of > (self.n or 1) and self.stream:
            found.append(("best_of", "`best_of` above `n` cannot be streamed"))
        kind = self.response_format.type if self.response_format else "text"
        if kind != "text":
            why = f"response_format {kind!r} is not supported: no constrained decoding here"
            found.append(("response_format", why))
        if self.tools:
            found.append(("tools", "tool calling is not supported by this policy"))
        if isinstance(self.tool_choice, dict) or self.tool_choice == "required":
            found.append(("tool_choice", "tool calling is not supported by this policy"))
        if self.functions:
            found.append(("functions", "function calling is not supported by this policy"))
        if isinstance(self.function_call, dict):
            found.append(("function_call", "function calling is not supported by this policy"))
        if self.modalities and "audio" in self.modalities:
            found.append(("modalities", "only text output is supported"))
        for name in ("audio", "web_search_options", "moderation"):
            if getattr(self, name) is not None:
                found.append((name, f"`{name}` is not supported by this policy"))
        return found

    def ignored(self) -> list[str]:
        names = [n for n in HOSTING_FIELDS if getattr(self, n) is not None]
        names += [f"messages[{i}].name" for i, m in enumerate(self.messages) if m.name]
        return super().ignored() + names


HOSTING_FIELDS = (
    "store",
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "safety_identifier",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "parallel_tool_calls",
)
"""Chat fields that are accepted and ignored, with a logged warning."""


def message_refusals(param: str, message) -> list[tuple[str, str]]:
    if message.role in ("tool", "function"):
        return [(f"{param}.role", f"{message.role!r} messages need tool calling, not supported")]
    found = []
    if message.role == "assistant":
        for name in ("tool_calls", "function_call", "audio"):
            if getattr(message, name):
                found.append((f"{param}.{name}", f"assistant `{name}` is not supported"))
        if message.content is None and message.refusal is None and not found:
            found.append((f"{param}.content", "an assistant message needs content"))
    if isinstance(message.content, list):
        for j, part in enumerate(message.content):
            if isinstance(part, UnsupportedPart):
                found.append(
                    (
                        f"{param}.content[{j}].type",
                        f"{part.type!r} input is not supported (text only)",
                    )
                )
    return found


def message_text(message) -> str:
    """The text of a message: its string content, or its text (and refusal) parts joined."""
    content = message.content
    if content is None:
        return message.refusal or ""
    if isinstance(content, str):
        return content
    return "\n".join(p.text if isinstance(p, TextPart) else p.refusal for p in content)


class CompletionRequest(SamplingFields):
    """Legacy text completions: the prompt is sent as is, without a chat template."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=16)] = Field(
        description="A prompt, or a list of them (token-id prompts are not supported)."
    )
    max_tokens: int | None = Field(16, ge=1, le=2**31 - 1, description="Bound on new tokens.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LEGACY_LOGPROBS, description="Alternatives per position to return."
    )
    echo: bool | None = Field(False, description="`true` is refused.")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only equal to `n`.")
    suffix: str | None = Field(None, max_length=MAX_TEXT, description="Refused.")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def max_new_tokens(self) -> tuple[str, int | None]:
        return "max_tokens", self.max_tokens

    def refusals(self) -> list[tuple[str, str]]:
        found = super().refusals()
        if self.echo:
            found.append(("echo", "`echo` is not supported (no prompt log-probs)"))
        if self.suffix:
            found.append(("suffix", "`suffix` (insertion) is not supported"))
        if self.best_of is not None and self.best_of != (self.n or 1):
            found.append(("best_of", "`best_of` other than `n` is not supported"))
        if self.stream and len(self.prompts) > 1:
            found.append(("prompt", "streaming takes one prompt"))
        return found


# ----- responses -----


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    response_id: str = Field(description="This sample's id: post feedback about it with this id.")
    reward: float | None = Field(
        None, description="Extension: the reward model's score of this choice (with `best_of`)."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str = Field(
        description="The policy's response id of the first choice: the feedback handle."
    )
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str = Field(description="`weights-v<N>`: the policy weights that answered.")
    reward_model_version: int | None = Field(
        None, description="Extension: the reward model that ranked the choices (with `best_of`)."
    )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int] = Field(description="Offset of each token in the choice's text.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    response_id: str = Field(description="This sample's id: post feedback about it with this id.")


class CompletionResponse(BaseModel):
    id: str = Field(description="The policy's response id of the first choice.")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlhf-platform"
    weights_version: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorObject(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error.")
    param: str | None = Field(description="The request field at fault, e.g. `messages[0].role`.")
    code: str | None = Field(description="e.g. model_not_found, unsupported_parameter.")


class ErrorResponse(BaseModel):
    error: ErrorObject

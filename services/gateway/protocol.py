"""Wire schemas of the gateway's HTTP API (pydantic, strict).

Every request model forbids unknown fields and bounds every length and count, so bad input is a
422 whose `detail[].loc` names the field. Chat completions follow OpenAI's schema (the subset the
policy can honour); the feedback models are the platform's own.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_TEXT = 32_000
"""Characters in one prompt, message or response."""

ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"

Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
StopString = Annotated[str, Field(min_length=1, max_length=64)]
Category = Annotated[str, Field(min_length=1, max_length=64)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


# ----- chat completions (OpenAI-compatible) -----


class ChatMessageIn(Strict):
    role: Literal["system", "user", "assistant"] = Field(description="Who said it.")
    content: str = Field(min_length=1, max_length=MAX_TEXT, description="The message text.")


class ChatCompletionRequest(Strict):
    model: str = Field("policy", min_length=1, max_length=128, description="Served model name.")
    messages: list[ChatMessageIn] = Field(
        min_length=1, max_length=64, description="The chat so far."
    )
    max_tokens: int | None = Field(None, ge=1, le=4096, description="Upper bound on new tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=4, description="Samples to return (each has its own response id).")
    stream: bool = Field(False, description="Send tokens as server-sent events.")
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        None, description="Up to 4 stop strings."
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Seed for reproducible sampling."
    )
    user: str | None = Field(None, max_length=128, description="End-user id, for abuse monitoring.")

    @field_validator("stream")
    @classmethod
    def _stream_one_sample(cls, stream: bool, info: ValidationInfo) -> bool:
        if stream and info.data.get("n", 1) != 1:
            raise ValueError("streaming returns exactly one sample: `n` must be 1")
        return stream

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    response_id: str = Field(description="This sample's id: post feedback about it with this id.")


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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlhf-platform"
    weights_version: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----- feedback -----


class FeedbackRequest(Strict):
    response_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=ID_PATTERN,
        description="The `id` a chat completion returned.",
    )
    thumb: Literal["up", "down"] | None = Field(None, description="Thumbs up or down.")
    rating: int | None = Field(
        None, ge=1, le=5, validate_default=True, description="A 1-5 rating instead of a thumb."
    )
    comment: str | None = Field(None, max_length=4000, description="Free text.")
    categories: list[Category] = Field(
        default_factory=list,
        max_length=16,
        description="Tags such as `helpful`, `unsafe` (each 1-64 chars).",
    )
    user_id: str | None = Field(None, max_length=128, description="The product's user id.")
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=ID_PATTERN,
        description="The same key twice is stored once; retry with the same key after a 503.",
    )

    @field_validator("rating")
    @classmethod
    def _one_judgement(cls, rating: int | None, info: ValidationInfo) -> int | None:
        if "thumb" not in info.data:
            return rating  # `thumb` itself failed; its own error names it
        if (info.data["thumb"] is None) == (rating is None):
            raise ValueError("give exactly one of `thumb` or `rating`")
        return rating


class PreferenceRequest(Strict):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT, description="The prompt both answer.")
    chosen: str = Field(min_length=1, max_length=MAX_TEXT, description="The better response.")
    rejected: str = Field(min_length=1, max_length=MAX_TEXT, description="The worse response.")
    idempotency_key: str | None = Field(None, min_length=1, max_length=128, pattern=ID_PATTERN)

    @field_validator("rejected")
    @classmethod
    def _distinct(cls, rejected: str, info: ValidationInfo) -> str:
        if rejected == info.data.get("chosen"):
            raise ValueError("must differ from `chosen`")
        return rejected


class RankingRequest(Strict):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT, description="The prompt all answer.")
    responses: list[Text] = Field(
        min_length=2, max_length=16, description="K responses ranked best first (2 <= K <= 16)."
    )
    idempotency_key: str | None = Field(None, min_length=1, max_length=128, pattern=ID_PATTERN)

    @field_validator("responses")
    @classmethod
    def _distinct_responses(cls, responses: list[str]) -> list[str]:
        if len(set(responses)) != len(responses):
            raise ValueError("the ranked responses must be distinct")
        return responses


class Accepted(BaseModel):
    id: str = Field(description="Feedback id (or preference/ranking id) of the stored event.")
    status: Literal["accepted"] = "accepted"
    duplicate: bool = Field(description="True when this idempotency key was already stored.")
    records: int = Field(description="Kafka records written for this event.")

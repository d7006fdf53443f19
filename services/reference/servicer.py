"""gRPC ReferenceService: checks and converts messages, calls ReferenceScorer, records metrics.

Bad input is INVALID_ARGUMENT naming the field, e.g.
`sequences[1].response_token_ids[4]: token id 99999 is outside the vocabulary [0, 49152)`.
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import BATCH_BUCKETS
from services.common.rpc import FieldError, abort_for, remaining_s
from services.genproto.rlhf.v1 import reference_pb2, reference_pb2_grpc
from services.reference.scorer import ModelLimits, ReferenceScorer
from services.reference.settings import ReferenceSettings


class ReferenceMetrics:
    """rlhf_reference_*: sequences per request, per Triton forward pass, tokens, model version."""

    def __init__(self, registry: CollectorRegistry):
        self.request_sequences = Histogram(
            "rlhf_reference_request_sequences",
            "Sequences per ComputeLogprobs request.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.model_batch_size = Histogram(
            "rlhf_reference_model_batch_size",
            "Sequences in the Triton forward pass that served a request chunk.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.response_tokens = Counter(
            "rlhf_reference_response_tokens_total",
            "Response tokens given log-probs.",
            registry=registry,
        )
        self.model_version = Gauge(
            "rlhf_reference_model_version",
            "Version of the frozen reference model.",
            registry=registry,
        )


def _check_ids(ids, field: str, vocab_size: int) -> None:
    bad = next((j for j, t in enumerate(ids) if t >= vocab_size), None)
    if bad is not None:
        raise FieldError(
            f"{field}[{bad}]", f"token id {ids[bad]} is outside the vocabulary [0, {vocab_size})"
        )


def checked_sequences(
    request: reference_pb2.ComputeLogprobsRequest, settings: ReferenceSettings, limits: ModelLimits
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of a valid request; FieldError names the first bad field."""
    if request.model not in ("", settings.model_name):
        raise FieldError(
            "model", f"unknown model {request.model!r}; this service serves {settings.model_name!r}"
        )
    if not request.sequences:
        raise FieldError("sequences", "empty batch: send at least one sequence")
    if len(request.sequences) > settings.max_sequences:
        raise FieldError(
            "sequences",
            f"{len(request.sequences)} sequences exceed the limit of {settings.max_sequences}",
        )
    max_tokens = min(settings.max_total_tokens or limits.max_positions, limits.max_positions)
    sequences = []
    for i, sequence in enumerate(request.sequences):
        prompt, response = list(sequence.prompt_token_ids), list(sequence.response_token_ids)
        if not prompt:
            raise FieldError(
                f"sequences[{i}].prompt_token_ids", "empty prompt: at least one token is needed"
            )
        if not response:
            raise FieldError(
                f"sequences[{i}].response_token_ids", "empty response: nothing to give log-probs"
            )
        if len(prompt) + len(response) > max_tokens:
            raise FieldError(
                f"sequences[{i}]",
                f"{len(prompt) + len(response)} tokens exceed the model's limit of {max_tokens}",
            )
        _check_ids(prompt, f"sequences[{i}].prompt_token_ids", limits.vocab_size)
        _check_ids(response, f"sequences[{i}].response_token_ids", limits.vocab_size)
        sequences.append((prompt, response))
    return sequences


class ReferenceServicer(reference_pb2_grpc.ReferenceServiceServicer):
    def __init__(
        self,
        settings: ReferenceSettings,
        limits: ModelLimits,
        scorer: ReferenceScorer,
        metrics: ReferenceMetrics,
    ):
        self.settings = settings
        self.limits = limits
        self.scorer = scorer
        self.metrics = metrics
        metrics.model_version.set(settings.model_version)

    def ComputeLogprobs(
        self, request: reference_pb2.ComputeLogprobsRequest, context: grpc.ServicerContext
    ) -> reference_pb2.ComputeLogprobsResponse:
        try:
            sequences = checked_sequences(request, self.settings, self.limits)
            self.metrics.request_sequences.observe(len(sequences))
            computed = self.scorer.logprobs(
                sequences, remaining_s(context, self.settings.triton.timeout_s)
            )
        except Exception as error:  # noqa: BLE001 - abort_for re-raises what it does not map
            abort_for(context, error, "reference")
        for size in computed.model_batch_sizes:
            self.metrics.model_batch_size.observe(size)
        self.metrics.response_tokens.inc(sum(len(r) for _, r in sequences))
        return reference_pb2.ComputeLogprobsResponse(
            results=[
                reference_pb2.ResponseLogprobs(logprobs=row.tolist()) for row in computed.logprobs
            ]
        )

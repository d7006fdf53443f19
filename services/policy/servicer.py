"""rlhf.v1.PolicyService: converts messages, checks them (validation.py), runs the plan on the
Triton model (engine.py), logs every served generation to Kafka, and hands weight pushes to
updates.py.

Generation log: every sample is produced to `rlhf.generations.v1` (key = response id) and the
RPC waits for Kafka's acks=all before it returns (before the last chunk of a streamed sample):
a response id a client holds is always joinable with the feedback that will name it. If Kafka
does not acknowledge within `kafka_ack_timeout_s`, the call fails UNAVAILABLE rather than hand
out an id the curator will never see. Cancelled streams are logged without waiting.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.topics import GENERATIONS
from services.common.weights_wire import ChunkView, WireError, decode_request
from services.genproto.rlhf.v1 import common_pb2, events_pb2, policy_pb2, policy_pb2_grpc
from services.policy.detokenize import StreamedText, position_logprobs, visible_text
from services.policy.engine import (
    GenerationCancelled,
    GenerationTimeout,
    ModelError,
    PolicyEngine,
    SequenceEvent,
)
from services.policy.metrics import PolicyMetrics
from services.policy.updates import WeightsUpdater
from services.policy.validation import GenerationPlan, InvalidArgument, Limits, plan_generation
from services.policy.weights import WeightsRejected

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admission:
    """Bounds on the generation in flight (PolicySettings: max_queued_sequences, max_kv_tokens,
    admission, admission_queue_timeout_s)."""

    max_sequences: int
    max_kv_tokens: int = 1 << 62
    queue: bool = False
    """Wait for room (up to queue_timeout_s and the call's deadline) instead of refusing."""
    queue_timeout_s: float = 10.0


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(
        self,
        engine: PolicyEngine,
        tokenizer,
        limits: Limits,
        updater: WeightsUpdater,
        metrics: PolicyMetrics,
        model_info: dict,
        max_queued_sequences: int,
        producer=None,
        kafka_ack_timeout_s: float = 10.0,
        default_timeout_s: float = 60.0,
        admission: Admission | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.updater = updater
        self.metrics = metrics
        self.model_info = model_info
        self.producer = producer
        self.kafka_ack_timeout_s = kafka_ack_timeout_s
        self.default_timeout_s = default_timeout_s
        self.admission = admission or Admission(max_queued_sequences)
        self._queued = 0
        self._kv_tokens = 0
        self._waiting = 0
        self._room = threading.Condition()

    # Generate -----------------------------------------------------------------------------

    def Generate(self, request, context):
        plan = self._plan(
            context, request.model, list(request.prompts), request.sampling, stream=False
        )
        finals = {}
        with self._admitted(context, plan), self._errors(context):
            cancelled = self._cancel_event(context)
            for event, _ in self.engine.run(plan.sequences, self._timeout(context), cancelled):
                finals[event.index] = event
        response = policy_pb2.GenerateResponse(model=self.limits.served_name)
        pending = []
        for p, prompt in enumerate(plan.prompts):
            completion = response.completions.add(
                prompt_index=p, prompt_token_ids=prompt.prompt_ids
            )
            for j in range(plan.n):
                event = finals[p * plan.n + j]
                sample = self._sample(
                    event.token_ids,
                    event.logprobs,
                    event.finish_reason,
                    event.weights_version,
                    plan.sequences[0].stop,
                )
                if plan.token_logprobs:
                    sample.token_logprobs.extend(self._positions(event))
                completion.samples.append(sample)
                self.metrics.batch_size.observe(event.batch_size)
                pending.append(self._log(prompt, sample))
        response.weights_version = max((e.weights_version for e in finals.values()), default=0)
        self._wait_logged(context, pending)
        return response

    def GenerateStream(self, request, context):
        plan = self._plan(
            context, request.model, [request.prompt], request.sampling, stream=True, field="prompt"
        )
        prompt = plan.prompts[0]
        stops = plan.sequences[0].stop
        tokens = {j: [] for j in range(plan.n)}
        logprobs = {j: [] for j in range(plan.n)}
        texts = {j: StreamedText(self._decode, stops) for j in range(plan.n)}
        ids = {j: str(uuid.uuid4()) for j in range(plan.n)}
        with self._admitted(context, plan), self._errors(context):
            cancelled = self._cancel_event(context)
            for event, _ in self.engine.run(plan.sequences, self._timeout(context), cancelled):
                j = event.index
                tokens[j] += event.token_ids
                logprobs[j] += event.logprobs
                stopped = event.finish_reason == common_pb2.FINISH_REASON_STOP_STRING
                chunk = policy_pb2.GenerateStreamResponse(
                    sample_index=j,
                    response_id=ids[j],
                    token_ids=event.token_ids,
                    logprobs=event.logprobs,
                    text_delta=texts[j].push(event.token_ids, stopped, event.final),
                    weights_version=event.weights_version,
                    prompt_tokens=len(prompt.prompt_ids),
                )
                if plan.token_logprobs and event.token_ids:
                    chunk.token_logprobs.extend(self._positions(event))
                if event.final:
                    self.metrics.batch_size.observe(event.batch_size)
                    sample = self._sample(
                        tokens[j],
                        logprobs[j],
                        event.finish_reason,
                        event.weights_version,
                        stops,
                        ids[j],
                    )
                    self._wait_logged(context, [self._log(prompt, sample)])
                    chunk.finish_reason = event.finish_reason
                yield chunk

    # Model info and weights ---------------------------------------------------------------

    def GetModelInfo(self, request, context):
        return policy_pb2.GetModelInfoResponse(
            model=self.limits.served_name,
            weights_version=self.updater.version,
            dtype=self.model_info.get("dtype", ""),
            parameter_count=int(self.model_info.get("parameter_count", 0)),
            device=self.model_info.get("device", ""),
        )

    def UpdateWeights(self, request_iterator, context):
        """Its requests arrive undecoded (see `add_to_server`): `weights_wire` parses them and
        leaves each chunk's data in the received bytes."""
        try:
            first = decode_request(next(request_iterator, b""))
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"manifest: {exc}")
        if not isinstance(first, policy_pb2.WeightsManifest):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "manifest: the first message must be the manifest"
            )
        try:
            if first.transport == policy_pb2.WeightsManifest.TRANSPORT_SIDE_CHANNEL:
                # The bytes come over the side channel: its ticket goes back in the initial
                # metadata, which only this authorised caller sees.
                version, received = self.updater.receive_push(
                    first, offer=lambda ticket: _offer(context, self.updater, ticket)
                )
            else:
                version, received = self.updater.receive_push(first, _chunks(request_iterator))
        except WeightsRejected as exc:
            log.warning("weights refused: %s", exc)
            self.metrics.weights_updates.labels("push", "refused").inc()
            return policy_pb2.UpdateWeightsResponse(
                accepted=False, weights_version=self.updater.version, reason=str(exc)
            )
        self.metrics.weights_updates.labels("push", "accepted").inc()
        return policy_pb2.UpdateWeightsResponse(
            accepted=True, weights_version=version, bytes_received=received
        )

    # Helpers ------------------------------------------------------------------------------

    def _plan(
        self, context, model, prompts, sampling, stream: bool, field: str = "prompts"
    ) -> GenerationPlan:
        try:
            return plan_generation(
                model, prompts, sampling, self.tokenizer, self.limits, stream, field
            )
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    @contextmanager
    def _admitted(self, context, plan: GenerationPlan):
        """Admission control in front of Triton: all of a request's sequences or none, within
        `Admission`'s bounds on sequences in flight and on reserved KV-cache tokens; beyond
        them RESOURCE_EXHAUSTED at once, or after waiting for room when the policy queues."""
        size = len(plan.sequences)
        tokens = sum(len(s.prompt_ids) + s.max_new_tokens for s in plan.sequences)
        limits = self.admission
        fits = lambda: (
            self._queued + size <= limits.max_sequences
            and self._kv_tokens + tokens <= limits.max_kv_tokens
        )
        with self._room:
            # A request bigger than the bounds themselves is admitted alone, never refused forever.
            admitted = fits() or self._queued == 0
            if not admitted and limits.queue:
                self._waiting += size
                self.metrics.admission_waiting.set(self._waiting)
                wait_s = min(limits.queue_timeout_s, self._timeout(context))
                admitted = self._room.wait_for(lambda: fits() or self._queued == 0, wait_s)
                self._waiting -= size
                self.metrics.admission_waiting.set(self._waiting)
            if admitted:
                self._queued += size
                self._kv_tokens += tokens
                self._show_load()
        if not admitted:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"generation queue full ({limits.max_sequences} sequences, "
                f"{limits.max_kv_tokens} KV-cache tokens)",
            )
        try:
            yield
        finally:
            with self._room:
                self._queued -= size
                self._kv_tokens -= tokens
                self._show_load()
                self._room.notify_all()

    def _show_load(self) -> None:
        self.metrics.queue_depth.set(self._queued)
        self.metrics.kv_tokens.set(self._kv_tokens)

    @contextmanager
    def _errors(self, context):
        try:
            yield
        except GenerationTimeout as exc:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except GenerationCancelled as exc:
            context.abort(grpc.StatusCode.CANCELLED, str(exc))
        except ModelError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"policy model: {exc}")

    def _timeout(self, context) -> float:
        remaining = context.time_remaining()
        return self.default_timeout_s if remaining is None else max(0.0, remaining)

    @staticmethod
    def _cancel_event(context) -> threading.Event:
        event = threading.Event()
        context.add_callback(event.set)  # runs when the RPC ends for any reason, cancel included
        return event

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _token_texts(self, ids: list[int]) -> list[str]:
        return self.tokenizer.batch_decode([[t] for t in ids])

    def _positions(self, event: SequenceEvent) -> list[policy_pb2.PositionLogprobs]:
        return position_logprobs(
            self._token_texts, event.token_ids, event.logprobs, event.top_ids, event.top_logprobs
        )

    def _sample(
        self, tokens, logprobs, finish, version, stop, response_id: str | None = None
    ) -> policy_pb2.Sample:
        # The text ends before a stop string (OpenAI's convention); token_ids keep every
        # generated token so that log-probs stay aligned with them.
        stopped = finish == common_pb2.FINISH_REASON_STOP_STRING
        text = visible_text(self._decode(tokens), list(stop), stopped)
        self.metrics.generated_tokens.inc(len(tokens))
        return policy_pb2.Sample(
            response_id=response_id or str(uuid.uuid4()),
            text=text,
            token_ids=tokens,
            logprobs=logprobs,
            finish_reason=finish,
            weights_version=version,
        )

    def _log(self, prompt, sample: policy_pb2.Sample):
        if self.producer is None:
            return None
        created = Timestamp()
        created.GetCurrentTime()
        record = events_pb2.GenerationRecord(
            response_id=sample.response_id,
            prompt=prompt.prompt,
            prompt_text=prompt.prompt_text,
            response_text=sample.text,
            prompt_token_ids=prompt.prompt_ids,
            response_token_ids=sample.token_ids,
            logprobs=sample.logprobs,
            weights_version=sample.weights_version,
            model=self.limits.served_name,
            finish_reason=sample.finish_reason,
            created_at=created,
        )
        return self.producer.send(GENERATIONS, key=sample.response_id, value=record)

    def _wait_logged(self, context, futures) -> None:
        for future in futures:
            if future is None:
                continue
            try:
                future.get(timeout=self.kafka_ack_timeout_s)
            except Exception as exc:  # noqa: BLE001 - any Kafka failure means "not durable"
                self.metrics.generation_log_errors.inc()
                context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"generation log (Kafka) did not acknowledge: {exc}",
                )


def _offer(context, updater: WeightsUpdater, ticket) -> None:
    """Sends a side-channel ticket to the caller; a call that ends (cancelled, or past its
    deadline) takes its ticket with it."""
    listener = updater.side_channel
    context.add_callback(lambda: listener.revoke(ticket))
    context.send_initial_metadata(ticket.metadata())


def _chunks(requests) -> Iterator[ChunkView]:
    """The chunks of an UpdateWeights stream after its manifest; a malformed one refuses the push."""
    for raw in requests:
        try:
            part = decode_request(raw)
        except WireError as exc:
            raise WeightsRejected(f"malformed chunk message: {exc}") from exc
        if isinstance(part, ChunkView):
            yield part


class _Registrations:
    """Stands in for a server to capture the generated code's method handlers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def add_to_server(servicer: PolicyServicer, server: grpc.Server) -> None:
    """The generated registration, except that UpdateWeights receives its requests as bytes:
    protobuf would copy every chunk's data twice on the way in (services/common/weights_wire)."""
    captured = _Registrations()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, captured)
    handlers = dict(captured.handlers)
    handlers["UpdateWeights"] = handlers["UpdateWeights"]._replace(request_deserializer=None)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(captured.service, handlers),)
    )
    server.add_registered_method_handlers(captured.service, handlers)

"""The gRPC service's side of the Triton policy model: sends sequences on one decoupled stream
and yields the model's responses as they arrive.

Every call gets a client from a small pool (a stream per call: tritonclient allows one stream per
client) and its own deadline; when the deadline passes or the caller cancels, the stream is
cancelled, which Triton passes on to the model (`request.is_cancelled()`), so work stops.

The sequences of one call carry a group (GROUP_ID, GROUP_SIZE): the model's scheduler admits a
group's sequences at the same step once all have arrived, so the n samples of a prompt share one
prefill and one call gets the same rows together (and so the same numbers, to the last bit)
whether it streams or not.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from services.common.settings import TritonSettings
from services.common.triton_client import connect, make_inputs
from services.genproto.rlhf.v1 import common_pb2

GENERATION_OUTPUTS = [
    "TOKEN_IDS",
    "LOGPROBS",
    "FINISH_REASON",
    "WEIGHTS_VERSION",
    "BATCH_SIZE",
    "TOP_IDS",
    "TOP_LOGPROBS",
]
POLL_S = 0.05


class GenerationTimeout(TimeoutError):
    """The deadline passed before the model finished."""


class GenerationCancelled(RuntimeError):
    """The caller went away; the model was told to stop."""


class ModelError(RuntimeError):
    """Triton or the model reported an error."""


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence for the model: one sample of one prompt."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int = 0

    def arrays(self, group: tuple[int, int] = (0, 1)) -> dict[str, np.ndarray]:
        """The model's inputs; `group` is (call id, sequences in the call)."""
        arrays = {
            "GROUP_ID": np.array([[group[0]]], dtype=np.int64),
            "GROUP_SIZE": np.array([[group[1]]], dtype=np.int32),
            "INPUT_IDS": np.asarray([self.prompt_ids], dtype=np.int64),
            "MAX_NEW_TOKENS": np.array([[self.max_new_tokens]], dtype=np.int32),
            "TEMPERATURE": np.array([[self.temperature]], dtype=np.float32),
            "TOP_P": np.array([[self.top_p]], dtype=np.float32),
            "TOP_K": np.array([[self.top_k]], dtype=np.int32),
            "SEED": np.array([[self.seed & 0x7FFF_FFFF_FFFF_FFFF]], dtype=np.int64),
            "STREAM": np.array([[self.stream]], dtype=np.bool_),
            "PRESENCE_PENALTY": np.array([[self.presence_penalty]], dtype=np.float32),
            "FREQUENCY_PENALTY": np.array([[self.frequency_penalty]], dtype=np.float32),
            "NUM_TOP_LOGPROBS": np.array([[self.top_logprobs]], dtype=np.int32),
        }
        if self.stop:
            arrays["STOP"] = np.array([[s.encode() for s in self.stop]], dtype=np.object_)
        if self.logit_bias:
            ids = sorted(self.logit_bias)
            arrays["LOGIT_BIAS_IDS"] = np.array([ids], dtype=np.int64)
            arrays["LOGIT_BIAS_VALUES"] = np.array(
                [[self.logit_bias[t] for t in ids]], dtype=np.float32
            )
        return arrays


@dataclass(frozen=True)
class SequenceEvent:
    """A response of the model for sequence `index`: new tokens, or the end (`final`)."""

    index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: int
    """An rlhf.v1.FinishReason value; FINISH_REASON_UNSPECIFIED until the sequence ends."""
    weights_version: int
    batch_size: int
    final: bool
    top_ids: list[list[int]] = field(default_factory=list)
    """Per token of `token_ids`, the ids of the best alternatives (empty unless asked for)."""
    top_logprobs: list[list[float]] = field(default_factory=list)


class PolicyEngine:
    """Talks to the `policy` Triton model."""

    def __init__(self, settings: TritonSettings, model: str = "policy", pool_size: int = 8):
        self.settings = settings
        self.model = model
        self._pool: queue.LifoQueue = queue.LifoQueue()
        self._pool_size = pool_size

    def _client(self) -> grpcclient.InferenceServerClient:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return connect(self.settings)

    def _release(self, client, healthy: bool) -> None:
        if healthy and self._pool.qsize() < self._pool_size:
            self._pool.put(client)
        else:
            client.close()

    def run(
        self,
        sequences: list[SequenceRequest],
        timeout_s: float | None = None,
        cancelled: threading.Event | None = None,
        outputs: list[str] = GENERATION_OUTPUTS,
    ) -> Iterator[tuple[SequenceEvent, dict[str, np.ndarray]]]:
        """Sends every sequence on one stream; yields (event, raw outputs) until all are final."""
        deadline = time.monotonic() + (
            timeout_s if timeout_s is not None else self.settings.timeout_s
        )
        responses: queue.Queue = queue.Queue()
        client = self._client()
        done, healthy = 0, False
        try:
            try:
                client.start_stream(callback=lambda result, error: responses.put((result, error)))
                group = (secrets.randbits(63), len(sequences))
                for i, seq in enumerate(sequences):
                    client.async_stream_infer(
                        self.model,
                        make_inputs(seq.arrays(group)),
                        request_id=str(i),
                        outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                        enable_empty_final_response=True,
                    )
            except InferenceServerException as err:  # e.g. a stream Triton broke: UNAVAILABLE
                raise ModelError(f"Triton stream: {err}") from err
            while done < len(sequences):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GenerationTimeout(f"no result within {timeout_s:.3f}s")
                if cancelled is not None and cancelled.is_set():
                    raise GenerationCancelled("caller cancelled")
                try:
                    result, error = responses.get(timeout=min(POLL_S, left))
                except queue.Empty:
                    continue
                if error is not None:
                    raise ModelError(str(error))
                response = result.get_response()
                params = response.parameters
                final = (
                    "triton_final_response" in params and params["triton_final_response"].bool_param
                )
                done += final
                if not response.outputs:
                    continue
                raw = {o: result.as_numpy(o) for o in outputs}
                yield to_event(int(response.id), raw, final), raw
            healthy = True
        finally:
            # A finished stream closes cleanly; anything else cancels what is still running.
            client.stop_stream(cancel_requests=not healthy)
            self._release(client, healthy)

    def control(self, timeout_s: float | None = None) -> tuple[int, dict]:
        """The served weights version and model facts; makes the model pick up new weights first."""
        probe = SequenceRequest([0], 0, 0.0, 1.0, 0, 0)
        for event, raw in self.run([probe], timeout_s, outputs=["WEIGHTS_VERSION", "INFO"]):
            info = raw["INFO"].reshape(-1)[0]
            return event.weights_version, json.loads(
                info.decode() if isinstance(info, bytes) else info
            )
        raise ModelError("the policy model sent no control response")

    def close(self) -> None:
        while not self._pool.empty():
            self._pool.get_nowait().close()


def to_event(index: int, raw: dict[str, np.ndarray], final: bool) -> SequenceEvent:
    def flat(name: str) -> list:
        value = raw.get(name)
        return [] if value is None else value.reshape(-1).tolist()

    finish, version, batch = flat("FINISH_REASON"), flat("WEIGHTS_VERSION"), flat("BATCH_SIZE")
    top_ids, top_logprobs = alternatives(raw.get("TOP_IDS"), raw.get("TOP_LOGPROBS"))
    return SequenceEvent(
        index=index,
        token_ids=[int(t) for t in flat("TOKEN_IDS")],
        logprobs=[float(x) for x in flat("LOGPROBS")],
        finish_reason=int(finish[0]) if finish else common_pb2.FINISH_REASON_UNSPECIFIED,
        weights_version=int(version[0]) if version else 0,
        batch_size=int(batch[0]) if batch else 0,
        final=final,
        top_ids=top_ids,
        top_logprobs=top_logprobs,
    )


def alternatives(
    ids: np.ndarray | None, logprobs: np.ndarray | None
) -> tuple[list[list[int]], list[list[float]]]:
    """The model's (1, tokens, K) padded alternatives as per-token lists, padding removed."""
    if ids is None or logprobs is None or ids.size == 0:
        return [], []
    out_ids, out_lp = [], []
    for row_ids, row_lp in zip(ids.reshape(-1, ids.shape[-1]), logprobs.reshape(-1, ids.shape[-1])):
        keep = row_ids >= 0
        out_ids.append([int(t) for t in row_ids[keep]])
        out_lp.append([float(v) for v in row_lp[keep]])
    return out_ids, out_lp

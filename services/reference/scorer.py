"""The reference service's logic, free of gRPC: token sequences in, per-token log-probs out.

    scorer = ReferenceScorer(settings)         # settings: ReferenceSettings
    result = scorer.logprobs([([1, 2, 3], [4, 5])], timeout_s=5)   # result.logprobs[0]: (2,) float32

Big requests are cut into chunks of at most the Triton batch size, sent concurrently so the
dynamic batcher can group them with other callers' chunks.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from services.common.triton_client import connect, make_inputs
from services.reference.settings import ReferenceSettings


@dataclass(frozen=True)
class ModelLimits:
    """What token sequences the served model can take."""

    vocab_size: int
    max_positions: int


def model_limits(model_dir: Path) -> ModelLimits:
    """From the model folder's config.json (the embedding rows and the position limit)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    positions = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    return ModelLimits(vocab_size=int(config["vocab_size"]), max_positions=int(positions))


@dataclass(frozen=True)
class ComputedLogprobs:
    logprobs: list[np.ndarray]
    """Per sequence, (A_i,) float32: log p(response[j] | prompt, response[:j])."""
    model_batch_sizes: list[int]
    """Sequences in each Triton forward pass that served this request (one entry per chunk)."""


def chunk_arrays(sequences: list[tuple[list[int], list[int]]]) -> dict[str, np.ndarray]:
    """Triton inputs for one chunk: right-padded TOKEN_IDS (B, T) and the two lengths (B, 1)."""
    lengths = [len(p) + len(r) for p, r in sequences]
    ids = np.zeros((len(sequences), max(lengths)), dtype=np.int64)  # (B, T)
    for i, (p, r) in enumerate(sequences):
        ids[i, : lengths[i]] = p + r
    return {
        "TOKEN_IDS": ids,
        "PROMPT_LENGTHS": np.array([[len(p)] for p, _ in sequences], dtype=np.int64),
        "RESPONSE_LENGTHS": np.array([[len(r)] for _, r in sequences], dtype=np.int64),
    }


class ReferenceScorer:
    """Client of the Triton `reference` model."""

    def __init__(self, settings: ReferenceSettings):
        self.settings = settings
        self.client = connect(settings.triton)

    def logprobs(
        self, sequences: list[tuple[list[int], list[int]]], timeout_s: float
    ) -> ComputedLogprobs:
        size = self.settings.triton_max_batch_size
        futures: list[Future] = []
        for start in range(0, len(sequences), size):
            future: Future = Future()
            self.client.async_infer(
                self.settings.triton_model,
                make_inputs(chunk_arrays(sequences[start : start + size])),
                callback=lambda result, error, f=future: (
                    f.set_exception(error) if error else f.set_result(result)
                ),
                outputs=[grpcclient.InferRequestedOutput(o) for o in ("LOGPROBS", "BATCH_SIZE")],
                client_timeout=timeout_s,
            )
            futures.append(future)
        logprobs, batch_sizes = [], []
        for index, future in enumerate(futures):
            result = future.result()
            padded = result.as_numpy("LOGPROBS")  # (B, A_max)
            for row, (_, response) in zip(padded, sequences[index * size : (index + 1) * size]):
                logprobs.append(row[: len(response)].astype(np.float32))
            batch_sizes.append(int(result.as_numpy("BATCH_SIZE")[0, 0]))
        return ComputedLogprobs(logprobs, batch_sizes)

    def close(self) -> None:
        self.client.close()

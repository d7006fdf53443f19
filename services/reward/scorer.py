"""The reward service's logic, free of gRPC: score text pairs and reload versions through Triton.

    scorer = RewardScorer(settings)                  # settings: RewardSettings
    scored = scorer.score(["2+2?"], ["4"], timeout_s=5)  # ScoredBatch(scores, spreads, ...)
    result = scorer.reload(8, "/models/reward/v8", manifest)  # ReloadResult(accepted, version, reason)

`reload` is what a follower of the reward-model versions topic calls (the curator publishes them);
the gRPC ReloadModel calls it too.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient

from services.common.annotator import load_annotator
from services.common.rpc import Aborted
from services.common.triton_client import connect, infer, make_inputs
from services.reward.settings import RewardSettings

VERSION_RETRIES = 3


@dataclass(frozen=True)
class ScoredBatch:
    scores: np.ndarray
    """(B,) float32, one per pair, in request order: the mean over the model's heads."""
    spreads: np.ndarray
    """(B,) float32: population std over the heads (0 with one head)."""
    members: np.ndarray
    """(B, M) float32: every head's score."""
    version: int
    """The reward-model version that produced every score."""
    model_batch_sizes: list[int]
    """Pairs in each Triton forward pass that served this request (one entry per chunk)."""


@dataclass(frozen=True)
class ReloadResult:
    accepted: bool
    version: int
    """The version served after the call."""
    reason: str


class RewardScorer:
    """Client of the Triton `reward` model: chunks big requests, keeps scores version-consistent."""

    def __init__(self, settings: RewardSettings):
        self.settings = settings
        self.client = connect(settings.triton)

    def _chunk_futures(
        self, prompts: list[str], responses: list[str], timeout_s: float
    ) -> list[Future]:
        futures = []
        for start in range(0, len(prompts), self.settings.triton_max_batch_size):
            end = start + self.settings.triton_max_batch_size
            arrays = {
                "PROMPT": np.array(prompts[start:end], dtype=np.object_).reshape(-1, 1),
                "RESPONSE": np.array(responses[start:end], dtype=np.object_).reshape(-1, 1),
            }
            future: Future = Future()
            self.client.async_infer(
                self.settings.triton_model,
                make_inputs(arrays),
                callback=lambda result, error, f=future: (
                    f.set_exception(error) if error else f.set_result(result)
                ),
                outputs=[
                    grpcclient.InferRequestedOutput(o)
                    for o in ("SCORE", "SPREAD", "MEMBERS", "VERSION", "BATCH_SIZE")
                ],
                client_timeout=timeout_s,
            )
            futures.append(future)
        return futures

    def score(self, prompts: list[str], responses: list[str], timeout_s: float) -> ScoredBatch:
        """Scores of all pairs, all from one version.

        Chunks run concurrently (so the batcher can group them); if a reload lands between two
        chunks, the chunks scored by the older version are scored again.
        """
        chunks = [r.result() for r in self._chunk_futures(prompts, responses, timeout_s)]
        size = self.settings.triton_max_batch_size
        for attempt in range(VERSION_RETRIES + 1):
            versions = [int(c.as_numpy("VERSION")[0, 0]) for c in chunks]
            newest = max(versions)
            stale = [i for i, v in enumerate(versions) if v != newest]
            if not stale:
                break
            if attempt == VERSION_RETRIES:
                raise Aborted(
                    "reward-model versions kept changing while scoring; retry the request"
                )
            for i in stale:
                span = slice(i * size, (i + 1) * size)
                chunks[i] = self._chunk_futures(prompts[span], responses[span], timeout_s)[
                    0
                ].result()
        # One version scored every chunk, and a version's head count is fixed (a reload to another
        # count is refused), so the members' widths agree.
        return ScoredBatch(
            scores=np.concatenate([c.as_numpy("SCORE")[:, 0] for c in chunks]).astype(np.float32),
            spreads=np.concatenate([c.as_numpy("SPREAD")[:, 0] for c in chunks]).astype(np.float32),
            members=np.concatenate([c.as_numpy("MEMBERS") for c in chunks]).astype(np.float32),
            version=newest,
            model_batch_sizes=[int(c.as_numpy("BATCH_SIZE")[0, 0]) for c in chunks],
        )

    def reload(
        self, version: int, path: str, file_sha256: dict[str, str], timeout_s: float = 300.0
    ) -> ReloadResult:
        """Asks the Triton model to check and swap in a new version; the old one serves on refusal."""
        order = json.dumps(
            {"version": int(version), "path": str(path), "file_sha256": dict(file_sha256)}
        )
        out = infer(
            self.client,
            self.settings.triton_model,
            {"RELOAD": np.array([[order]], dtype=np.object_)},
            ["RELOAD_RESULT"],
            timeout_s=timeout_s,
        )
        result = json.loads(out["RELOAD_RESULT"][0, 0])
        return ReloadResult(bool(result["accepted"]), int(result["version"]), str(result["reason"]))

    def close(self) -> None:
        self.client.close()


class RuleScorer:
    """RewardScorer's interface over a rule (`RewardSettings.annotator`) instead of a model: one
    head, spread 0, the configured version; nothing to reload."""

    def __init__(self, settings: RewardSettings):
        self.settings = settings
        self.annotator = load_annotator(settings.annotator)

    def score(self, prompts: list[str], responses: list[str], timeout_s: float) -> ScoredBatch:
        # A rule that returns no finite number raises AnnotatorError: INTERNAL, the rule's fault.
        scores = np.array(
            [self.annotator.score(p, r) for p, r in zip(prompts, responses)], np.float32
        )
        return ScoredBatch(
            scores=scores,
            spreads=np.zeros_like(scores),
            members=scores[:, None].copy(),
            version=self.settings.model_version,
            model_batch_sizes=[len(prompts)],
        )

    def reload(
        self, version: int, path: str, file_sha256: dict[str, str], timeout_s: float = 300.0
    ) -> ReloadResult:
        return ReloadResult(
            False,
            self.settings.model_version,
            f"a rule reward ({self.annotator.name}) has no model",
        )

    def close(self) -> None:
        pass

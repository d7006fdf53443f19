"""Client side of UpdateWeights: a manifest built from a folder of safetensors files, then the
files in chunks of any size (the channel's message limit is raised to fit them).

    from tests.support.push import push_folder
    response = push_folder(channel, Path("checkpoints/v2"), weights_version=2)

The manifest and the request stream are the trainer's own (`services.trainer.weights_push`);
this wraps them around a channel for the policy's tests and the weight-swap benchmark.
"""

from __future__ import annotations

from pathlib import Path

from services.common.control_auth import control_metadata
from services.genproto.rlhf.v1 import policy_pb2
from services.trainer.weights_push import (
    DEFAULT_CHUNK_BYTES,
    build_manifest,
    iter_requests,
    update_weights_call,
)

__all__ = ["DEFAULT_CHUNK_BYTES", "build_manifest", "push_folder"]


def push_folder(
    channel,
    folder: Path,
    weights_version: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    manifest: policy_pb2.WeightsManifest | None = None,
    timeout_s: float = 300.0,
) -> policy_pb2.UpdateWeightsResponse:
    """One UpdateWeights call on `channel`: the manifest, then the folder's files in chunks (the
    same stream the trainer sends, `services.trainer.weights_push`)."""
    manifest = manifest or build_manifest(folder, weights_version)
    return update_weights_call(channel)(
        iter_requests(folder, manifest, chunk_bytes),
        timeout=timeout_s,
        metadata=control_metadata(),
    )

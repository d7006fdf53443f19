"""The `reward` model inside Triton: text pairs in, scores out (mean and spread of an ensemble's
heads); reloadable in place.

Python backend, dynamic batching. Text arrives as BYTES and is tokenized here, with the tokenizer
of the version being served, through the reward-model trainer's own encoding
(services.reward.encoding). Whatever the batcher groups runs as one right-padded forward pass.

Tensors (per request; first dimension is Triton's batch dimension, B pairs):
    PROMPT         BYTES (B, 1)  rendered prompt text          } a scoring request
    RESPONSE       BYTES (B, 1)  response text                 }
    RELOAD         BYTES (1, 1)  JSON {version, path, file_sha256}: a control request
    SCORE          FP32  (B, 1)  the mean over the model's M heads (the one head's score if M = 1)
    SPREAD         FP32  (B, 1)  population std over the heads (0 with one head)
    MEMBERS        FP32  (B, M)  every head's score
    VERSION        UINT64 (B, 1) the reward-model version that produced the scores / now served
    BATCH_SIZE     INT64 (B, 1)  pairs in the forward pass that served this request
    RELOAD_RESULT  BYTES (1, 1)  JSON {accepted, version, reason}

Reload: a control request is applied before the scoring requests of the same `execute`, so a
swap happens between forward passes and every score names the version that produced it. The new
version is checked first (services.reward.checkpoint: sha256 of every file, tensor names, shapes
and dtypes); on any failure the old model keeps serving and the reason is returned. A version
with another head count has another classifier shape, so it is refused by that check: the
width of MEMBERS never changes under a running service. The model is
built from the verified bytes, then the (model, tokenizer, version) triple is replaced at once.

One instance per Triton model (reloads reach the instance that executes them); scale out with
replicas. CUDA bf16 when Triton gives the instance a GPU, CPU float32 otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.common.models import load_reward_model, load_tokenizer, select_dtype
from services.common.triton_repo import TensorIO, instance_device, model_parameters
from services.reward.checkpoint import (
    CheckpointRefused,
    compare_specs,
    folder_specs,
    read_verified,
    served_specs,
)
from services.reward.encoding import reward_batch

INPUTS = (
    TensorIO("PROMPT", "TYPE_STRING", (1,), optional=True),
    TensorIO("RESPONSE", "TYPE_STRING", (1,), optional=True),
    TensorIO("RELOAD", "TYPE_STRING", (1,), optional=True),
)
OUTPUTS = (
    TensorIO("SCORE", "TYPE_FP32", (1,)),
    TensorIO("SPREAD", "TYPE_FP32", (1,)),
    TensorIO("MEMBERS", "TYPE_FP32", (-1,)),
    TensorIO("VERSION", "TYPE_UINT64", (1,)),
    TensorIO("BATCH_SIZE", "TYPE_INT64", (1,)),
    TensorIO("RELOAD_RESULT", "TYPE_STRING", (1,)),
)


@dataclass(frozen=True)
class ServedVersion:
    """Everything that must change together when a new version is swapped in."""

    version: int
    path: Path
    model: torch.nn.Module
    tokenizer: object
    specs: dict


def load_verified_version(
    version: int,
    path: Path,
    file_sha256: dict[str, str],
    served: ServedVersion,
    device: torch.device,
    dtype: torch.dtype,
) -> ServedVersion:
    """A new version built from checked bytes; raises CheckpointRefused with the reason."""
    from safetensors.torch import load as load_safetensors
    from transformers import AutoConfig

    if version <= served.version:
        raise CheckpointRefused(
            f"version {version} is not newer than the served version {served.version}"
        )
    contents = read_verified(path, file_sha256)
    specs = folder_specs(contents)
    compare_specs(served.specs, specs)
    state = {}
    for name, data in contents.items():
        if name.endswith(".safetensors"):
            state.update(load_safetensors(data))
    try:
        # The served model's own class, built from the verified bytes (not re-read from disk).
        model = type(served.model).from_pretrained(
            None,
            config=AutoConfig.from_pretrained(str(path)),
            state_dict=state,
            dtype=dtype,
        )
        tokenizer = load_tokenizer(path)
    except Exception as error:  # noqa: BLE001 - any failure is a refusal; the old version keeps serving
        raise CheckpointRefused(
            f"cannot load the new version: {type(error).__name__}: {error}"
        ) from None
    return ServedVersion(version, Path(path), model.to(device).eval(), tokenizer, specs)


class RewardTritonModel:
    """Triton Python-backend model (TritonPythonModel API) scoring (prompt, response) pairs."""

    def initialize(self, args: dict) -> None:
        params = model_parameters(args)
        path = Path(params["model_dir"])
        self.device = instance_device(args)
        self.dtype = select_dtype(self.device, params["dtype"])
        self.max_length = int(params["max_length"])
        self.served = ServedVersion(
            version=int(params["version"]),
            path=path,
            model=load_reward_model(path, self.device, self.dtype),
            tokenizer=load_tokenizer(path),
            specs=served_specs(path),
        )

    def reload(self, order: dict) -> dict:
        """Applies a reload order; returns {accepted, version, reason}.

        Repeating the order of the version being served is accepted and changes nothing: the
        refresh re-sends its last order after a restart, and the CURRENT follower
        (services/reward/follower) may order what a ReloadModel already swapped in.
        """
        if int(order["version"]) == self.served.version and Path(order["path"]) == self.served.path:
            return {
                "accepted": True,
                "version": self.served.version,
                "reason": "already serving this version",
            }
        try:
            self.served = load_verified_version(
                int(order["version"]),
                Path(order["path"]),
                dict(order["file_sha256"]),
                self.served,
                self.device,
                self.dtype,
            )
            return {"accepted": True, "version": self.served.version, "reason": ""}
        except CheckpointRefused as refused:
            return {"accepted": False, "version": self.served.version, "reason": str(refused)}
        except Exception as error:  # noqa: BLE001 - e.g. an unreadable file: refuse, keep serving
            return {
                "accepted": False,
                "version": self.served.version,
                "reason": f"{type(error).__name__}: {error}",
            }

    @torch.inference_mode()
    def scores(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Every head's score of each pair: (B, M) float32."""
        served = self.served
        inputs = reward_batch(served.tokenizer, prompts, responses, self.max_length)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return served.model(**inputs).logits.float().cpu().numpy()  # (B, M)

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        def text(request, name: str) -> list[str] | None:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return None
            return [
                v.decode("utf-8") if isinstance(v, bytes) else str(v)
                for v in tensor.as_numpy()[:, 0]
            ]

        responses: list = [None] * len(requests)
        scoring: list[tuple[int, list[str], list[str]]] = []
        for i, request in enumerate(requests):
            reload_order, prompts, answers = (
                text(request, "RELOAD"),
                text(request, "PROMPT"),
                text(request, "RESPONSE"),
            )
            if (
                reload_order is not None
            ):  # control requests first: the swap precedes this batch's scores
                result = self.reload(json.loads(reload_order[0]))
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(
                            "RELOAD_RESULT", np.array([[json.dumps(result)]], dtype=np.object_)
                        ),
                        pb_utils.Tensor(
                            "VERSION", np.array([[result["version"]]], dtype=np.uint64)
                        ),
                    ]
                )
            elif prompts is None or answers is None or len(prompts) != len(answers):
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(
                        "PROMPT and RESPONSE are both required, one per pair"
                    )
                )
            else:
                scoring.append((i, prompts, answers))
        if scoring:
            prompts = [p for _, ps, _ in scoring for p in ps]
            answers = [a for _, _, rs in scoring for a in rs]
            members, version, batch = (
                self.scores(prompts, answers),  # (B, M)
                self.served.version,
                len(prompts),
            )
            mean = members.mean(axis=1, keepdims=True, dtype=np.float64)  # (B, 1)
            spread = members.std(axis=1, keepdims=True, dtype=np.float64)  # (B, 1), ddof=0
            start = 0
            for i, ps, _ in scoring:
                n, rows = len(ps), slice(start, start + len(ps))
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("SCORE", mean[rows].astype(np.float32)),
                        pb_utils.Tensor("SPREAD", spread[rows].astype(np.float32)),
                        pb_utils.Tensor(
                            "MEMBERS", np.ascontiguousarray(members[rows], dtype=np.float32)
                        ),
                        pb_utils.Tensor("VERSION", np.full((n, 1), version, dtype=np.uint64)),
                        pb_utils.Tensor("BATCH_SIZE", np.full((n, 1), batch, dtype=np.int64)),
                    ]
                )
                start += n
        return responses

    def finalize(self) -> None:
        self.served = None

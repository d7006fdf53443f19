"""The `reference` model inside Triton: a frozen causal LM that returns per-token log-probs.

Python backend, dynamic batching: every request holds B sequences (prompt + response token ids,
right-padded within the request, with their prompt and response lengths); whatever the batcher
groups runs as ONE left-padded forward pass (services.reference.logprobs) and is split back.

Tensors (per request; the first dimension is Triton's batch dimension, B sequences):
    TOKEN_IDS         INT64 (B, T)  prompt then response ids, right-padded with anything
    PROMPT_LENGTHS    INT64 (B, 1)
    RESPONSE_LENGTHS  INT64 (B, 1)
    LOGPROBS          FP32  (B, A)  right-padded with 0 beyond each response's length
    BATCH_SIZE        INT64 (B, 1)  sequences in the forward pass that served this request

CUDA bf16 when Triton gives the instance a GPU (KIND_GPU), CPU float32 otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.common.models import load_causal_lm, select_dtype
from services.common.triton_repo import TensorIO, instance_device, model_parameters
from services.reference.logprobs import ScoredSequence, response_logprobs

INPUTS = (
    TensorIO("TOKEN_IDS", "TYPE_INT64", (-1,), ragged=True),
    TensorIO("PROMPT_LENGTHS", "TYPE_INT64", (1,)),
    TensorIO("RESPONSE_LENGTHS", "TYPE_INT64", (1,)),
)
OUTPUTS = (
    TensorIO("LOGPROBS", "TYPE_FP32", (-1,)),
    TensorIO("BATCH_SIZE", "TYPE_INT64", (1,)),
)


class ReferenceTritonModel:
    """Triton Python-backend model (TritonPythonModel API) computing reference log-probs."""

    def initialize(self, args: dict) -> None:
        params = model_parameters(args)
        self.device = instance_device(args)
        self.model = load_causal_lm(
            Path(params["model_dir"]), self.device, select_dtype(self.device, params["dtype"])
        )

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        per_request: list[list[ScoredSequence]] = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "TOKEN_IDS").as_numpy()  # (B, T)
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT_LENGTHS").as_numpy()[
                :, 0
            ]  # (B,)
            response = pb_utils.get_input_tensor_by_name(request, "RESPONSE_LENGTHS").as_numpy()[
                :, 0
            ]  # (B,)
            per_request.append(
                [
                    ScoredSequence(row[:p], row[p : p + a])
                    for row, p, a in zip(ids, prompt, response)
                ]
            )
        sequences = [s for group in per_request for s in group]
        logprobs = response_logprobs(self.model, sequences, self.device)
        batch = len(sequences)
        responses, start = [], 0
        for group in per_request:
            rows = logprobs[start : start + len(group)]
            start += len(group)
            width = max(len(r) for r in rows)
            padded = np.zeros((len(rows), width), dtype=np.float32)  # (B, A)
            for i, row in enumerate(rows):
                padded[i, : len(row)] = row
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("LOGPROBS", padded),
                        pb_utils.Tensor(
                            "BATCH_SIZE", np.full((len(group), 1), batch, dtype=np.int64)
                        ),
                    ]
                )
            )
        return responses

    def finalize(self) -> None:
        self.model = None

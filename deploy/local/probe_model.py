"""A small real torch model served through Triton to prove the serving path end to end.

`make demo` and the foundation's integration tests load it into Triton next to the platform's
models: its output fetched with `tritonclient` must equal the same module run in process.
The model batches for real: whatever the dynamic batcher groups arrives as one forward pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from services.common.triton_repo import PythonModelSpec, TensorIO, model_parameters

IN_FEATURES = 8
OUT_FEATURES = 4


class ProbeMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(IN_FEATURES, 32), torch.nn.GELU(), torch.nn.Linear(32, OUT_FEATURES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, IN) -> (B, OUT)
        return self.net(x)


def save_probe(path: Path, seed: int = 0) -> ProbeMLP:
    """Builds a seeded ProbeMLP, writes it as safetensors, returns it."""
    torch.manual_seed(seed)
    model = ProbeMLP().eval()
    save_file(model.state_dict(), str(path))
    return model


def probe_spec(weights: Path, name: str = "probe") -> PythonModelSpec:
    return PythonModelSpec(
        name=name,
        python_class="deploy.local.probe_model:ProbeTritonModel",
        inputs=(TensorIO("INPUT", "TYPE_FP32", (IN_FEATURES,)),),
        outputs=(
            TensorIO("OUTPUT", "TYPE_FP32", (OUT_FEATURES,)),
            TensorIO("BATCH_SIZE", "TYPE_INT64", (1,)),
        ),
        max_batch_size=64,
        device="cpu",
        parameters={"weights": str(weights)},
    )


class ProbeTritonModel:
    """Triton Python-backend model (TritonPythonModel API) running ProbeMLP."""

    def initialize(self, args: dict) -> None:
        weights = model_parameters(args)["weights"]
        self.model = ProbeMLP().eval()
        self.model.load_state_dict(load_file(weights))

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        inputs = [pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy() for r in requests]
        sizes = [len(x) for x in inputs]
        with torch.inference_mode():
            outputs = self.model(torch.from_numpy(np.concatenate(inputs))).numpy()
        batch = np.int64(sum(sizes))
        responses, start = [], 0
        for n in sizes:
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("OUTPUT", outputs[start : start + n]),
                        pb_utils.Tensor("BATCH_SIZE", np.full((n, 1), batch, dtype=np.int64)),
                    ]
                )
            )
            start += n
        return responses

    def finalize(self) -> None:
        self.model = None

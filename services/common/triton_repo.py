"""Writes a standard Triton model repository for Python-backend models whose code lives here.

Each model folder gets a `config.pbtxt` (inputs, outputs, dynamic batching, instance group,
decoupled mode, parameters) and a one-line `1/model.py` that imports the real class from this
checkout, so the repository is generated, never hand-edited, and the same code runs in-process
in tests and inside Triton in production (where the Helm chart's init container writes it).
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class TensorIO:
    name: str
    data_type: str
    """Triton type name: TYPE_FP32, TYPE_INT64, TYPE_STRING, ..."""
    dims: tuple[int, ...]
    """Per-request shape without the batch dimension; -1 for variable."""
    optional: bool = False
    ragged: bool = False
    """Variable-length input the dynamic batcher may group across requests of different lengths
    (`allow_ragged_batch`); the model receives each request's tensor as it was sent."""


@dataclass(frozen=True)
class PythonModelSpec:
    name: str
    python_class: str
    """`package.module:ClassName` implementing the Python backend's TritonPythonModel API."""
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    max_batch_size: int = 16
    """0 disables batching; otherwise the dynamic batcher groups up to this many requests."""
    max_queue_delay_us: int = 2_000
    """How long the dynamic batcher waits to fill a batch."""
    decoupled: bool = False
    """Decoupled models send any number of responses per request (token streaming)."""
    instance_count: int = 1
    device: str = "auto"
    """`cpu`, `gpu` or `auto` (GPU when torch sees CUDA)."""
    dtype: str = "auto"
    """The weights dtype (`services.common.models.select_dtype`), written as the `dtype` parameter."""
    parameters: dict[str, str] = field(default_factory=dict)
    """Free-form string parameters the model reads in `initialize` (model folder, version...)."""


def config_pbtxt(spec: PythonModelSpec) -> str:
    def tensors(kind: str, items: tuple[TensorIO, ...]) -> str:
        blocks = []
        for t in items:
            dims = ", ".join(str(d) for d in t.dims)
            extra = ("\n    optional: true" if t.optional else "") + (
                "\n    allow_ragged_batch: true" if t.ragged else ""
            )
            blocks.append(
                f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: [ {dims} ]{extra}\n  }}'
            )
        return f"{kind} [\n" + ",\n".join(blocks) + "\n]\n"

    device = spec.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    lines = [
        f'name: "{spec.name}"',
        'backend: "python"',
        f"max_batch_size: {spec.max_batch_size}",
        tensors("input", spec.inputs),
        tensors("output", spec.outputs),
        f"instance_group [ {{ count: {spec.instance_count} kind: KIND_{device.upper()} }} ]",
    ]
    if spec.max_batch_size > 0:
        lines.append(
            f"dynamic_batching {{ max_queue_delay_microseconds: {spec.max_queue_delay_us} }}"
        )
    if spec.decoupled:
        lines.append("model_transaction_policy { decoupled: True }")
    for key, value in sorted({**spec.parameters, "dtype": spec.dtype}.items()):
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


CHECKOUT = Path(__file__).resolve().parents[2]


def model_parameters(args: dict) -> dict[str, str]:
    """The string parameters of a Python-backend model's config (its `initialize` args)."""
    return {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}


def instance_device(args: dict) -> torch.device:
    """The device Triton gave a Python-backend model instance (its `initialize` args):
    KIND_GPU -> that CUDA device, otherwise the CPU."""
    if args.get("model_instance_kind") == "GPU":
        return torch.device(f"cuda:{int(args.get('model_instance_device_id', 0))}")
    return torch.device("cpu")


def write_model(
    repository: Path, spec: PythonModelSpec, version: int = 1, python_path: list[str] | None = None
) -> Path:
    """Writes (or rewrites) one model; returns its folder.

    The Python-backend stub does not pass PYTHONPATH on to the model's interpreter, so the
    folders holding this code and its dependencies are written into `model.py` (by default the
    checkout and the running environment's site-packages; in the container image both are the
    image's site-packages).
    """
    module, _, cls = spec.python_class.partition(":")
    if python_path is None:
        python_path = [str(CHECKOUT), sysconfig.get_paths()["purelib"]]
    folder = Path(repository) / spec.name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config_pbtxt(spec))
    (folder / str(version) / "model.py").write_text(
        f'"""Generated by services.common.triton_repo; the model is {spec.python_class}."""\n'
        "import sys\n\n"
        f"for _path in reversed({python_path!r}):\n"
        "    if _path not in sys.path:\n"
        "        sys.path.insert(0, _path)\n\n"
        f"from {module} import {cls} as TritonPythonModel  # noqa: E402, F401\n"
    )
    return folder

"""What every offline stage shares: its base config, device and precision, data split, batches,
progress bars, the optimizer step, and the atomic write of the output folder with its summary.

Precision: on CUDA the forward runs under bf16 autocast over float32 weights (float32 master
weights, saved as float32); on CPU everything is float32 (`services.common.models.select_dtype`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from services.common.digest import sha256_file
from services.common.models import select_device, select_dtype
from services.common.training.data import (
    DataError,
    DataKind,
    load_records,
    split_by_prompt,
)
from services.common.training.encoding import (
    EncodedCompletion,
    collate_completions,
    completion_logprobs,
)

SUMMARY_FILE = "training_summary.json"


class ConfigError(ValueError):
    """A stage's configuration is unusable; the message names the field."""


@dataclass(kw_only=True)
class StageConfig:
    data: Path
    """Training data: a JSONL or Parquet file (columns: see services/common/training/data.py)."""
    output: Path
    """Folder to write the trained model to; written to a temporary sibling, then renamed."""
    model: Path
    """Hugging Face folder of the model to start from."""
    eval_data: Path | None = None
    """Held-out data file; without one, `eval_fraction` of the prompts in `data` are held out."""
    eval_fraction: float = 0.1
    """Share of prompts held out when `eval_data` is not given (split by prompt hash; 0: no eval)."""
    epochs: int = 1
    """Passes over the training data."""
    batch_size: int = 8
    """Records per optimizer step (a preference pair counts as one record)."""
    learning_rate: float = 1e-5
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    max_length: int = 1024
    """Longest token sequence; longer ones are truncated (see encoding.py)."""
    seed: int = 0
    """Seed of the shuffling and of torch."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: str = "auto"
    """Compute precision: `auto` (bf16 autocast on CUDA, float32 on CPU), `float32`, `bfloat16`."""
    overwrite: bool = False
    """Replace an existing output folder (otherwise its presence is an error, found before training)."""

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field; stages extend it."""
        checks = {
            "eval_fraction": 0.0 <= self.eval_fraction < 1.0,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0,
            "weight_decay": self.weight_decay >= 0,
            "max_grad_norm": self.max_grad_norm > 0,
            "max_length": self.max_length >= 2,
            "dtype": self.dtype in ("auto", "float32", "bfloat16"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"config field '{name}' has an invalid value {getattr(self, name)!r}"
                )
        if not Path(self.model).is_dir():
            raise ConfigError(f"config field 'model': {self.model} is not a model folder")
        if Path(self.output).exists() and not self.overwrite:
            raise ConfigError(
                f"config field 'output': {self.output} exists (set overwrite: true to replace it)"
            )


def config_as_json(config: StageConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


# ---------------------------------------------------------------------------------------------
# Device and precision


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    """Compute dtype of the forward passes; weights stay float32."""

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def make_runtime(config: StageConfig) -> Runtime:
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = select_device(config.device)
    return Runtime(device=device, dtype=select_dtype(device, config.dtype))


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The reference model: the starting weights, frozen, in eval mode."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def sequence_logps(
    model, encoded: list[EncodedCompletion], pad_token_id: int, runtime: Runtime
) -> torch.Tensor:
    """Summed completion log-probs (N,) of N encoded sequences, in one forward."""
    batch = collate_completions(encoded, pad_token_id).to(runtime.device)
    with runtime.autocast():
        return completion_logprobs(model, batch)


# ---------------------------------------------------------------------------------------------
# Data


def load_split(
    config: StageConfig, kind: DataKind, chat_allowed: bool = True
) -> tuple[list, list, dict]:
    """(train records, held-out records, provenance for the summary)."""
    train = load_records(config.data, kind, chat_allowed)
    provenance = {"train": {"path": str(config.data), "sha256": sha256_file(config.data)}}
    if config.eval_data is not None:
        held_out = load_records(config.eval_data, kind, chat_allowed)
        provenance["eval"] = {
            "path": str(config.eval_data),
            "sha256": sha256_file(config.eval_data),
        }
    else:
        train, held_out = split_by_prompt(train, config.eval_fraction)
        provenance["eval"] = {"split_of_train": True, "eval_fraction": config.eval_fraction}
        if config.eval_fraction > 0 and not held_out:
            raise DataError(
                f"{config.data}: no prompt fell in the held-out split; raise eval_fraction or give eval_data"
            )
    if not train:
        raise DataError(
            f"{config.data}: no training records left after holding out the evaluation split"
        )
    provenance["train"]["records"] = len(train)
    provenance["eval"]["records"] = len(held_out)
    return train, held_out, provenance


def shuffled_batches(records: list, batch_size: int, rng: random.Random) -> list[list]:
    """One epoch of batches; a trailing single record joins the batch before it (KTO needs >= 2)."""
    order = list(records)
    rng.shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    return batches


def in_batches(records: list, batch_size: int) -> Iterator[list]:
    for start in range(0, len(records), batch_size):
        yield records[start : start + batch_size]


def progress(iterable: Iterable, description: str, total: int | None = None):
    return tqdm(
        iterable, desc=description, total=total, file=sys.stderr, dynamic_ncols=True, leave=False
    )


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    max_grad_norm: float,
) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return float(grad_norm)


def make_optimizer(model: torch.nn.Module, config: StageConfig) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)


# ---------------------------------------------------------------------------------------------
# Output


def save_model_folder(
    output: Path, model: torch.nn.Module, tokenizer, summary: dict[str, Any], overwrite: bool
) -> Path:
    """Writes safetensors, config, tokenizer and the summary to a temporary sibling, then renames it
    into place, so a reader sees the old folder or the complete new one, never half of one."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if output.exists():
        if not overwrite:
            shutil.rmtree(staging, ignore_errors=True)
            raise ConfigError(
                f"config field 'output': {output} appeared during training; not replaced"
            )
        retired = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output)
    return output


def build_summary(
    stage: str,
    config: StageConfig,
    metrics: dict[str, float],
    data: dict,
    started: float,
    steps: int,
) -> dict:
    import transformers

    return {
        "stage": stage,
        "base_model": str(config.model),
        "config": config_as_json(config),
        "data": data,
        "metrics": metrics,
        "steps": steps,
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }

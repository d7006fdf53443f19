"""LoRA training in the learner, through peft: the policy's base weights stay frozen and only the
adapters (and any value head) are optimised, checkpointed and pushed.

    policy = wrap(load_causal_lm(...), config)   # config.lora_rank > 0
    adapter = adapter_state_dict(policy)         # peft's names, CPU: what a push sends
    weights = merged_state_dict(policy)          # base + (alpha/r) B @ A: what the policy serves

The reference model is untouched by any of this: the rollouts carry the reference service's
log-probs of the frozen base, which is what the adapted policy's base (adapters off) computes.
The wire format of a pushed adapter is services/common/lora_adapter.py; the policy merges it
(services/policy/lora.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import blake3
import torch

from services.common.lora_adapter import AdapterConfig
from services.trainer.config import LearnerConfig

ADAPTER = "default"
"""peft's name of the one adapter the learner trains."""


def wrap(model, config: LearnerConfig):
    """The model with LoRA adapters on `config.lora_target_modules`; only those train. peft
    initialises B to zero, so the wrapped model computes exactly what the base did."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.lora_target_modules),
        lora_dropout=config.lora_dropout,
        bias="none",
    )
    wrapped = get_peft_model(model, lora, adapter_name=ADAPTER)
    # peft's new dropout modules start in training mode; the learner runs in eval mode and
    # turns adapter dropout on only where the loss is computed (`adapter_dropout`).
    return wrapped.eval()


def base_fingerprint(model) -> str:
    """BLAKE3 of the base weights (names, dtypes, shapes and bytes, in name order): adapters are
    only meaningful on the base they were trained on, and a checkpoint holds no base of its own.
    ~0.1 s for SmolLM2-135M's 540 MB."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        hasher.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        hasher.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return hasher.hexdigest()


def signature(config: LearnerConfig, base: str = "") -> dict:
    """What a checkpoint must agree on with the learner resuming from it ({} without LoRA):
    the LoRA settings and the base weights' fingerprint (`base_fingerprint`)."""
    if not config.lora_rank:
        return {}
    return {
        "rank": config.lora_rank,
        "alpha": float(config.lora_alpha),
        "target_modules": sorted(config.lora_target_modules),
        "base_blake3": base,
    }


def adapter_config(config: LearnerConfig, base_version: int) -> AdapterConfig:
    return AdapterConfig(
        config.lora_rank,
        float(config.lora_alpha),
        tuple(sorted(config.lora_target_modules)),
        base_version,
    )


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's saved names (`base_model.model.M.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def load_adapter_state(model, tensors: dict[str, torch.Tensor]) -> None:
    """Loads adapter tensors saved by `adapter_state_dict`; every adapter tensor must be there."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"checkpoint and learner disagree on the LoRA adapter (missing {missing[:2]}, "
            f"unexpected {extra[:2]})"
        )
    result = set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER)
    if result.unexpected_keys:
        raise ValueError(f"adapter tensors not loaded: {result.unexpected_keys[:2]}")


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights the adapted policy computes with, under the base model's names: each targeted
    weight is base + peft's own delta (scaling * B @ A); the model is not modified."""
    from peft.tuners.lora import LoraLayer

    base_model = model.get_base_model()
    deltas = {
        f"{name}.weight": module.get_delta_weight(ADAPTER)
        for name, module in base_model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in base_model.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        merged[name] = tensor
    return merged


@contextmanager
def adapter_dropout(model, enabled: bool) -> Iterator[None]:
    """Adapter dropout on for the duration (the rest of the model stays in eval mode)."""
    modules = [
        m for n, m in model.named_modules() if enabled and n.endswith(f"lora_dropout.{ADAPTER}")
    ]
    for module in modules:
        module.train()
    try:
        yield
    finally:
        for module in modules:
            module.eval()


def peft_config_json(model) -> dict:
    """peft's adapter_config.json content, so a pushed folder opens with PeftModel.from_pretrained."""
    config = model.peft_config[ADAPTER].to_dict()
    return json.loads(
        json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    )

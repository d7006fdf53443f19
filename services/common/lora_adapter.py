"""A LoRA adapter as it travels from the trainer to the policy: one safetensors file in peft's
own layout, whose header metadata says how to merge it.

    <version folder>/adapter_model.safetensors   peft's tensor names:
        base_model.model.<module>.lora_A.weight  (r, in_features)
        base_model.model.<module>.lora_B.weight  (out_features, r)
      metadata "rlhf_lora": {"rank", "alpha", "target_modules", "base_version"}
    <version folder>/adapter_config.json         peft's config (PeftModel.from_pretrained reads it)

The trainer writes both (services/trainer/weights_push.write_adapter_version); only the
safetensors file is pushed (a push carries `*.safetensors` files), so the merge settings ride
inside it and cannot arrive apart from the tensors. The policy merges it into the base weights of
`base_version` (services/policy/lora.py): W = W_base + (alpha / rank) * B @ A.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ADAPTER_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
METADATA_KEY = "rlhf_lora"
PEFT_PREFIX = "base_model.model."
LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


@dataclass(frozen=True)
class AdapterConfig:
    """What the receiver of an adapter needs to merge it."""

    rank: int
    """r: rows of A, columns of B."""
    alpha: float
    """LoRA alpha; the update is scaled by alpha / rank."""
    target_modules: tuple[str, ...]
    """Module names the adapter was trained on (q_proj, v_proj, ...)."""
    base_version: int
    """The weights version the adapter applies to (the frozen base the trainer trains on)."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_metadata(self) -> dict[str, str]:
        """safetensors metadata (string values only)."""
        config = {
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": sorted(self.target_modules),
            "base_version": self.base_version,
        }
        return {"format": "pt", METADATA_KEY: json.dumps(config)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> AdapterConfig:
        """Raises ValueError when the metadata holds no valid adapter config."""
        try:
            raw = json.loads((metadata or {})[METADATA_KEY])
            config = cls(
                rank=int(raw["rank"]),
                alpha=float(raw["alpha"]),
                target_modules=tuple(str(m) for m in raw["target_modules"]),
                base_version=int(raw["base_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"no valid {METADATA_KEY!r} adapter config in the metadata: {exc}")
        if config.rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {config.rank}")
        return config


def is_adapter_tensor(name: str) -> bool:
    return name.endswith((LORA_A, LORA_B))


def target_weight(name: str) -> str:
    """The base weight an adapter tensor updates: `base_model.model.M.lora_A.weight` -> `M.weight`."""
    stem = name.removeprefix(PEFT_PREFIX)
    for suffix in (LORA_A, LORA_B):
        if stem.endswith(suffix):
            return stem.removesuffix(suffix) + ".weight"
    raise ValueError(f"{name} is not a LoRA adapter tensor")


def read_config(path: Path) -> AdapterConfig:
    """The merge settings from an adapter file's header (no tensor data is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return AdapterConfig.from_metadata(f.metadata())

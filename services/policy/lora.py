"""LoRA at the policy: a pushed adapter is merged into the served base weights at the swap, so
Triton keeps loading one plain full set of tensors and generation costs nothing extra.

    merged = merge(base, adapter, config.scaling)    # W = W_base + (alpha / r) * B @ A
    base   = unmerge(merged, base, adapter)          # the kept base tensors, bit for bit
    merge_folder(staged, base_files, cache_dir)      # what WeightsUpdater does before publishing

The adapter's format (peft's names, the merge settings in the file's metadata) is shared with
the trainer: services/common/lora_adapter.py. Functions here are pure over state dicts, except
`merge_folder`, which reads and writes the staged version folder.

Exactness: the update is computed in float32 and added to the base in float32, then cast to the
base's dtype once; peft's `merge_and_unload` computes the same sum. Unmerging never subtracts
(B @ A rounded to bf16 and taken off again would not give the base back): the base tensors are
kept (the policy's model folder) and copied back.
Shapes: `r` rank, `I` in_features, `O` out_features; A (r, I), B (O, r), W (O, I).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from services.common.lora_adapter import (
    ADAPTER_FILE,
    LORA_A,
    AdapterConfig,
    is_adapter_tensor,
    read_config,
    target_weight,
)
from services.common.safetensors_header import TensorSpecs

MERGED_FILE = "model-lora.safetensors"
REST_FILE = "model-base.safetensors"
KEPT_ADAPTER_DIR = "adapter"
"""Subfolder of a published version that keeps the adapter it was merged from (out of the
`*.safetensors` glob, so Triton never loads it as weights)."""
FLOAT_DTYPES = {"F32", "F16", "BF16"}

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def pairs(adapter: dict[str, torch.Tensor]) -> Pairs:
    """Base weight name -> (A, B); raises ValueError on a half pair or a stray tensor."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapter.items():
        if not is_adapter_tensor(name):
            raise ValueError(f"{name} is not a LoRA adapter tensor")
        found.setdefault(target_weight(name), {})["A" if name.endswith(LORA_A) else "B"] = tensor
    result: Pairs = {}
    for weight, both in found.items():
        if set(both) != {"A", "B"}:
            raise ValueError(f"adapter for {weight} lacks its lora_{'B' if 'A' in both else 'A'}")
        result[weight] = (both["A"], both["B"])
    return result


def delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """(alpha / r) * B @ A in float32: (O, r) @ (r, I) -> (O, I)."""
    return (b.float() @ a.float()) * scaling


def merge(
    base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """A new state dict: targeted weights are base + delta (cast to the base dtype), every other
    tensor is the base's own (not copied)."""
    merged = dict(base)
    for weight, (a, b) in pairs(adapter).items():
        if weight not in base:
            raise ValueError(f"the adapter targets {weight}, which the base does not hold")
        w = base[weight]
        if w.shape != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weight}: base {list(w.shape)} does not fit A {list(a.shape)}, B {list(b.shape)}"
            )
        merged[weight] = (w.float() + delta(a, b, scaling)).to(w.dtype)
    return merged


def unmerge(
    merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The base again: every weight the adapter touched comes back from the kept base tensors
    (exact); the untouched ones are taken from `merged`, which holds them unchanged."""
    restored = dict(merged)
    for weight in pairs(adapter):
        restored[weight] = base[weight]
    return restored


def is_adapter(specs: TensorSpecs) -> bool:
    return bool(specs) and all(is_adapter_tensor(name) for name in specs)


def adapter_problems(served: TensorSpecs, adapter: TensorSpecs) -> list[str]:
    """Every way an adapter's tensors (from a manifest or a header) do not fit the served model:
    each A (r, I) and B (O, r) pair must target a served 2-D weight (O, I), one rank throughout,
    float dtypes. The receiver checks this before any byte, in place of equality with the served
    tensors (services/policy/weights.compare_specs)."""
    problems: list[str] = []
    found: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    for name, spec in sorted(adapter.items()):
        try:
            found.setdefault(target_weight(name), {})["A" if name.endswith(LORA_A) else "B"] = spec
        except ValueError as exc:
            problems.append(str(exc))
    ranks = set()
    for weight, both in sorted(found.items()):
        if set(both) != {"A", "B"}:
            problems.append(f"adapter for {weight} is half a pair")
            continue
        if weight not in served:
            problems.append(f"adapter targets {weight}, which the served model does not hold")
            continue
        (a_shape, a_dtype), (b_shape, b_dtype) = both["A"], both["B"]
        w_shape = served[weight][0]
        if len(a_shape) != 2 or len(b_shape) != 2 or len(w_shape) != 2:
            problems.append(f"adapter for {weight}: A, B and the weight must be 2-D")
            continue
        if (b_shape[0], a_shape[1]) != tuple(w_shape) or a_shape[0] != b_shape[1]:
            problems.append(
                f"adapter for {weight}: A {list(a_shape)}, B {list(b_shape)} do not fit "
                f"the served {list(w_shape)}"
            )
        if a_dtype not in FLOAT_DTYPES or b_dtype not in FLOAT_DTYPES:
            problems.append(f"adapter for {weight}: dtypes {a_dtype}, {b_dtype} are not float")
        ranks.add(a_shape[0])
    if len(ranks) > 1:
        problems.append(f"adapter mixes ranks {sorted(ranks)}")
    return problems


def holds_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_FILE).is_file()


def merge_folder(staged: Path, base_files: list[Path], cache_dir: Path) -> AdapterConfig:
    """Turns a staged adapter version into a full one, in two shards that together hold every
    base tensor in the base's dtypes:
      - `model-lora.safetensors`: the targeted weights, base + adapter (what changes per version);
      - `model-base.safetensors`: every other base tensor, the same for every version of one base
        and target set, so it is written once into `cache_dir` and hard-linked into each version
        (writing all 540 MB of SmolLM2 took 1.1 s here, the 106 MB shard of q/k/v/o 0.13 s).
    The adapter moves into `adapter/`, out of the `*.safetensors` glob that lists a version's
    weights."""
    staged = Path(staged)
    config = read_config(staged / ADAPTER_FILE)
    adapter = load_file(staged / ADAPTER_FILE)
    adapter_pairs = pairs(adapter)
    rank = {a.shape[0] for a, _ in adapter_pairs.values()}
    if rank != {config.rank}:
        raise ValueError(f"adapter metadata says rank {config.rank}, its tensors {sorted(rank)}")
    targeted: dict[str, torch.Tensor] = {}
    for path in base_files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = [n for n in f.keys() if n in adapter_pairs]  # noqa: SIM118 - not a dict
            targeted.update({n: f.get_tensor(n) for n in names})
    merged = merge(targeted, adapter, config.scaling)
    for name in (MERGED_FILE, REST_FILE):
        (staged / name).unlink(missing_ok=True)  # a recycled folder's old weights
    save_file(merged, staged / MERGED_FILE, metadata={"format": "pt"})
    rest = _rest_shard(base_files, set(adapter_pairs), Path(cache_dir))
    try:
        os.link(rest, staged / REST_FILE)
    except OSError:  # another filesystem: a copy
        shutil.copyfile(rest, staged / REST_FILE)
    kept = staged / KEPT_ADAPTER_DIR
    kept.mkdir(exist_ok=True)
    shutil.move(staged / ADAPTER_FILE, kept / ADAPTER_FILE)
    return config


def _rest_shard(base_files: list[Path], targeted: set[str], cache_dir: Path) -> Path:
    """The base's untargeted tensors as one safetensors file in `cache_dir`, reused while the base
    files and the file itself are as they were when it was written: a push that overwrote a
    linked copy in place (WeightsStore.staging recycles folders) changes its size or mtime, and
    the shard is then written again."""
    stamp = [
        (str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in base_files
    ]
    key = hashlib.sha256(json.dumps([stamp, sorted(targeted)]).encode()).hexdigest()[:16]
    path, sidecar = (
        cache_dir / f".lora-base-{key}.safetensors",
        cache_dir / f".lora-base-{key}.json",
    )
    try:
        st = os.stat(path)
        if json.loads(sidecar.read_text()) == [st.st_size, st.st_mtime_ns, st.st_ino]:
            return path
    except (FileNotFoundError, ValueError):
        pass
    rest: dict[str, torch.Tensor] = {}
    for base in base_files:
        rest.update({n: t for n, t in load_file(base).items() if n not in targeted})
    tmp = path.with_name(path.name + ".tmp")
    save_file(rest, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    st = os.stat(path)
    sidecar.write_text(json.dumps([st.st_size, st.st_mtime_ns, st.st_ino]))
    return path

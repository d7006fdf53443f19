"""Models load from safetensors only: a folder holding a pickled `pytorch_model.bin` (which can run
code when unpickled) is refused, not loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.models import load_causal_lm, load_reward_model


def _tiny_llama(folder: Path, safe: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if safe:
        model.save_pretrained(folder)
    else:  # what an old or hostile checkpoint looks like (transformers 5 writes no .bin itself)
        folder.mkdir(parents=True)
        config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_a_pickled_checkpoint_is_refused(tmp_path: Path):
    pickled = _tiny_llama(tmp_path / "pickled", safe=False)
    assert (pickled / "pytorch_model.bin").exists()
    assert not (pickled / "model.safetensors").exists()
    with pytest.raises(OSError, match="safetensors"):
        load_causal_lm(pickled, torch.device("cpu"), torch.float32)
    with pytest.raises(OSError, match="safetensors"):
        load_reward_model(pickled, torch.device("cpu"), torch.float32)


def test_the_same_weights_as_safetensors_load(tmp_path: Path):
    model = load_causal_lm(_tiny_llama(tmp_path / "safe", safe=True), torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) > 0

"""Fixtures for the trainer's unit tests: a policy small enough that RL converges in seconds.

`small_vocab_policy_dir` is a 2-layer Llama with a 16-token vocabulary (token 0 is EOS and
padding): with SmolLM2's 49k-token vocabulary a random policy would almost never emit a chosen
token, and a reward that is always 0 teaches nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

VOCAB = 16
EOS = PAD = 0


def build_small_vocab_policy(out_dir: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def small_vocab_policy_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama with a 16-token vocabulary (token ids only, no tokenizer)."""
    return build_small_vocab_policy(tmp_path_factory.mktemp("small-vocab-lm"))


@pytest.fixture(autouse=True)
def _few_threads():
    # The test machine is shared; one intra-op thread is faster than contending for two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Tiny random models with real tokenizers, built on the fly so tests run in seconds.

The causal LM has SmolLM2's architecture (Llama) and tokenizer with 2 layers and a small hidden
size; the reward model is MiniLM's architecture (BERT) and tokenizer, shrunk the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.common.models import minilm_dir, smollm2_tokenizer_dir


def tiny_causal_lm(out_dir: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Writes a random Llama-architecture causal LM with SmolLM2's tokenizer to `out_dir`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_reward_model(out_dir: Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """Writes a random BERT-architecture scalar reward model with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=512,
        num_labels=1,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir

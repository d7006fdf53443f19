"""The offline training stages behind the `rlhf` command line (services/cli.py):

- `sft.py`     supervised fine-tuning, loss on completion tokens only;
- `reward.py`  Bradley-Terry reward model on pairs and rankings (`train-reward`);
- `dpo.py`     direct preference optimisation (and IPO) against a frozen reference;
- `kto.py`     KTO on thumbs-up/down labels.

Shared pieces: `data.py` (TRL column conventions, JSONL/Parquet, clear errors), `encoding.py`
(tokens, and `encode_for_reward`, the reward model's one input encoding), `losses.py` (pure
registered losses), `common.py` (config base, device, batches, atomic output folder).
Tests: `pytest tests/unit/common/training tests/unit/test_cli.py`.
"""

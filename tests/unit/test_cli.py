"""The `rlhf` command line end to end: `python -m services.cli sft` in a subprocess writes a folder
the policy service loads; bad data and bad configuration exit with status 2 and a clear reason."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.cli import main
from services.common.models import load_causal_lm
from services.common.training.stage import SUMMARY_FILE
from tests.unit.common.training.synthetic import counting_demonstrations, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]


def rlhf(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sft_from_the_command_line_writes_a_loadable_folder(tmp_path, tiny_lm_dir):
    data = write_jsonl(tmp_path / "demos.jsonl", counting_demonstrations(40, seed=3))
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model: {tiny_lm_dir}\nlearning_rate: 1e-3\neval_fraction: 0.25\nbatch_size: 8\n"
    )
    output = tmp_path / "out" / "sft-1"

    done = rlhf(
        "sft",
        "--config",
        str(config),
        "--data",
        str(data),
        "--output",
        str(output),
        "--set",
        "epochs=1",
    )

    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    assert printed["output"] == str(output)
    assert printed["metrics"]["eval/loss_after"] < printed["metrics"]["eval/loss_before"]
    summary = json.loads((output / SUMMARY_FILE).read_text())
    assert (
        summary["stage"] == "sft"
        and summary["data"]["train"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    )
    assert summary["config"]["learning_rate"] == 1e-3 and summary["config"]["epochs"] == 1
    model = load_causal_lm(output, torch.device("cpu"), torch.float32)
    assert model.config.vocab_size == 49152
    assert [p.name for p in output.parent.iterdir()] == ["sft-1"]  # the staging folder was renamed


def test_bad_data_exits_2_naming_file_line_and_column(tmp_path, tiny_lm_dir):
    rows = counting_demonstrations(4, seed=4)
    rows[2] = {"prompt": "Count on from 3:", "completion": 4}
    data = write_jsonl(tmp_path / "demos.jsonl", rows)

    done = rlhf(
        "sft", "--model", str(tiny_lm_dir), "--data", str(data), "--output", str(tmp_path / "out")
    )

    assert done.returncode == 2
    assert (
        f"{data} line 3: column 'completion' must be a non-empty string or a list of chat messages, got int"
        in done.stderr
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "bta=0.2"], "unknown config field(s) ['bta']"),
        (["--set", "beta=high"], "config field 'beta' must be float, got 'high'"),
        (["--set", "beta=-1"], "config field 'beta' must be positive"),
        (["--set", "loss=ppo"], "config field 'loss' must be one of ('dpo', 'ipo')"),
        ([], "missing config field(s) ['data']"),
    ],
)
def test_bad_configuration_exits_2_naming_the_field(tmp_path, tiny_lm_dir, capsys, extra, message):
    data = [
        "--data",
        str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])),
    ]
    args = [
        "dpo",
        "--model",
        str(tiny_lm_dir),
        "--output",
        str(tmp_path / "out"),
        *(data if extra else []),
        *extra,
    ]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_existing_output_is_refused_before_training(tmp_path, tiny_lm_dir, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert (
        main(
            ["dpo", "--model", str(tiny_lm_dir), "--data", str(data), "--output", str(tiny_lm_dir)]
        )
        == 2
    )
    assert "exists (set overwrite: true to replace it)" in capsys.readouterr().err

"""bench/gpu_check.sh without a GPU: its dry run (what CI runs) parses the arguments and finds
every piece (modules, model folder, the GPU tests, the training arguments) and exits 0; a bad
argument or a missing piece fails with a message that names it, before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPT = REPO_ROOT / "bench" / "gpu_check.sh"
MODEL = REPO_ROOT / "models" / "smollm2-135m-instruct"


def gpu_check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_dry_run_finds_every_piece_and_succeeds_without_cuda(tmp_path):
    if not (MODEL / "model.safetensors").is_file():
        pytest.skip("models/smollm2-135m-instruct is built by `make models`")
    out = tmp_path / "gpu.json"
    done = gpu_check("--dry-run", "--budget-s", "600", "--out", str(out))
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("gpu_check.sh --dry-run: ok")
    assert "7 tests in tests/integration/gpu/test_gpu_path.py" in line
    assert "--device cuda" in line and "budget 600s" in line and str(out) in line
    assert not out.exists()  # a dry run measures nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frobnicate"], "unknown argument '--frobnicate'"),
        (["--dry-run", "--budget-s", "10"], "--budget-s must be a whole number of seconds"),
        (["--dry-run", "--budget-s", "ten"], "got 'ten'"),
        (["--dry-run", "--model-dir"], "--model-dir needs a value"),
        (["--out", "--dry-run"], "--out needs a value"),
    ],
)
def test_a_bad_argument_fails_with_a_clear_message(args, message):
    done = gpu_check(*args, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert "see --help" in done.stderr


def test_a_missing_model_folder_is_named(tmp_path):
    done = gpu_check("--dry-run", "--model-dir", str(tmp_path / "nowhere"), timeout=60)
    assert done.returncode == 2
    assert f"model folder {tmp_path / 'nowhere'} has no config.json" in done.stderr


def test_help_lists_every_option():
    done = gpu_check("--help", timeout=60)
    assert done.returncode == 0
    for option in ("--dry-run", "--model-dir", "--out", "--budget-s", "--skip-training"):
        assert option in done.stdout

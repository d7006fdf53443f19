#!/usr/bin/env bash
# The GPU path, checked and measured on one CUDA machine in under 10 minutes.
#
#   bench/gpu_check.sh             # writes bench/results/gpu_check.json (make gpu-check)
#   bench/gpu_check.sh --dry-run   # no CUDA needed: arguments, modules, model, tests (CI)
#
# 1. services: tests/integration/gpu with RLHF_GPU_CHECK=1: the policy and reference services
#    serving the model in bf16 on CUDA inside Triton; log-probs equal to in-process, greedy
#    equal to `generate`, a swap under load with zero failed requests; generation tokens/s.
# 2. training: bench/trainer_vs_trl.py --device cuda: our learner's update time against TRL's
#    GRPOTrainer on the GPU (learner_ratio_vs_trl), then the overlap gain on one GPU.
# 3. the two parts' figures, pass/fail and every process's peak RSS into one JSON.
# Each step runs under `timeout`, sized so that all of them fit --budget-s; a step that runs
# out of time is recorded as such, and the script exits non-zero.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

usage() {
  cat <<'EOF'
usage: bench/gpu_check.sh [--dry-run] [--model-dir DIR] [--out FILE] [--budget-s SECONDS]
                          [--skip-training]
  --dry-run         check arguments, Python modules, model folder and tests; no CUDA needed
  --model-dir DIR   model to serve and train (default models/smollm2-135m-instruct)
  --out FILE        result JSON (default bench/results/gpu_check.json)
  --budget-s N      wall-clock budget of the whole check, 300-3600 (default 570)
  --skip-training   only the services part
EOF
}

fail_usage() {
  echo "gpu_check.sh: $1 (see --help)" >&2
  exit 2
}

DRY_RUN=0
SKIP_TRAINING=0
MODEL_DIR="models/smollm2-135m-instruct"
OUT="bench/results/gpu_check.json"
BUDGET_S=570
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --skip-training) SKIP_TRAINING=1 ;;
    --model-dir | --out | --budget-s)
      [[ $# -ge 2 && "$2" != --* ]] || fail_usage "$1 needs a value"
      case "$1" in
        --model-dir) MODEL_DIR="$2" ;;
        --out) OUT="$2" ;;
        --budget-s) BUDGET_S="$2" ;;
      esac
      shift
      ;;
    -h | --help) usage; exit 0 ;;
    *) fail_usage "unknown argument '$1'" ;;
  esac
  shift
done
[[ "$BUDGET_S" =~ ^[0-9]+$ ]] && ((BUDGET_S >= 300 && BUDGET_S <= 3600)) ||
  fail_usage "--budget-s must be a whole number of seconds from 300 to 3600, got '$BUDGET_S'"

# The Makefile's virtual environment (keyed by the lock file's hash), unless PYTHON names one.
LOCK_HASH="$(sha256sum requirements.lock | cut -c1-12)"
PY="${PYTHON:-${RLHF_CACHE:-$HOME/.cache/rlhf-platform}/venv-$LOCK_HASH/bin/python}"
[[ -x "$PY" ]] || { echo "gpu_check.sh: no Python at $PY (run make setup, or set PYTHON)" >&2; exit 2; }
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

SERVICE_TESTS="tests/integration/gpu/test_gpu_path.py"
EXPECTED_TESTS=(
  test_the_services_serve_bf16_on_the_gpu
  test_greedy_equals_in_process_generate
  "test_policy_logprobs_equal_in_process[1.0]"
  "test_policy_logprobs_equal_in_process[0.7]"
  test_reference_logprobs_equal_in_process
  test_generation_throughput
  test_a_swap_under_load_fails_no_request
)
# The training step's work: 8 prompts x 4 = 32 samples per step, 64 new tokens.
TRAINING_ARGS=(--device cuda --prompts-per-step 8 --group-size 4 --max-new-tokens 64
  --steps 4 --repeats 2 --overlap-steps 5 --overlap-repeats 1 --model-dir "$MODEL_DIR")

# ---- the pieces, found (the dry run stops after this) --------------------------------------
command -v timeout >/dev/null || { echo "gpu_check.sh: needs coreutils' timeout" >&2; exit 2; }
[[ -f "$MODEL_DIR/config.json" && -f "$MODEL_DIR/model.safetensors" ]] ||
  { echo "gpu_check.sh: model folder $MODEL_DIR has no config.json + model.safetensors (make models)" >&2; exit 2; }
"$PY" - <<'EOF' || { echo "gpu_check.sh: a module it needs does not import (above)" >&2; exit 2; }
import importlib
for name in ("torch", "transformers", "trl", "psutil", "tritonclient.grpc", "services.policy.server",
             "services.reference.server", "services.trainer.learner", "deploy.local.triton",
             "bench.memory", "bench.run", "bench.trainer_vs_trl", "bench.overlap"):
    importlib.import_module(name)
from deploy.local.triton import tritonserver_binary
assert tritonserver_binary().exists(), tritonserver_binary()
EOF
collected="$(RLHF_GPU_CHECK_COLLECT=1 "$PY" -m pytest --collect-only -q -p no:cacheprovider "$SERVICE_TESTS" 2>&1)" ||
  { echo "$collected" >&2; echo "gpu_check.sh: cannot collect $SERVICE_TESTS" >&2; exit 2; }
for name in "${EXPECTED_TESTS[@]}"; do
  grep -qF "$SERVICE_TESTS::$name" <<<"$collected" ||
    { echo "gpu_check.sh: test $name not found in $SERVICE_TESTS" >&2; exit 2; }
done
"$PY" -m bench.trainer_vs_trl --dry-run "${TRAINING_ARGS[@]}" >/dev/null ||
  { echo "gpu_check.sh: bench.trainer_vs_trl refuses the training arguments (above)" >&2; exit 2; }

if ((DRY_RUN)); then
  echo "gpu_check.sh --dry-run: ok: python $PY, model $MODEL_DIR, ${#EXPECTED_TESTS[@]} tests in" \
    "$SERVICE_TESTS, training via bench.trainer_vs_trl ${TRAINING_ARGS[*]}, budget ${BUDGET_S}s," \
    "out $OUT"
  exit 0
fi

# ---- the check -----------------------------------------------------------------------------
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  { echo "gpu_check.sh: no CUDA device visible to torch (use --dry-run on a CPU machine)" >&2; exit 3; }
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
STARTED=$SECONDS
# 45% of the budget to the services; of the rest (less 30 s for the report) 65% to the
# comparison with TRL and what remains to the overlap runs.
SERVICES_S=$((BUDGET_S * 45 / 100))

echo ">> 1. services on CUDA (timeout ${SERVICES_S}s)"
services_rc=0
RLHF_GPU_CHECK=1 RLHF_GPU_CHECK_MODEL_DIR="$MODEL_DIR" RLHF_GPU_CHECK_FIGURES="$WORK/services.json" \
  timeout --kill-after=20 "$SERVICES_S" "$PY" -m pytest -q -p no:cacheprovider -rA \
  --junitxml="$WORK/services.xml" "$SERVICE_TESTS" || services_rc=$?

if ((services_rc == 124 || services_rc == 137)); then
  # Killed mid-run, pytest left its Triton (a daemon in its own session) behind.
  "$PY" -m deploy.local reap || true
fi

# Two runs, so that the comparison's figures survive an overlap run that runs out of time
# (`--parts overlap` keeps the other figures of the file it updates).
training_rc=skipped
overlap_rc=skipped
if ((SKIP_TRAINING == 0)); then
  left=$((BUDGET_S - (SECONDS - STARTED) - 30))
  TRAINING_S=$((left * 65 / 100))
  echo ">> 2a. training on CUDA, ours vs TRL (timeout ${TRAINING_S}s)"
  training_rc=0
  timeout --kill-after=20 "$TRAINING_S" "$PY" -m bench.trainer_vs_trl "${TRAINING_ARGS[@]}" \
    --parts trl --out "$WORK/training.json" || training_rc=$?
  OVERLAP_S=$((BUDGET_S - (SECONDS - STARTED) - 30))
  if ((OVERLAP_S >= 60)); then
    echo ">> 2b. overlap on one GPU (timeout ${OVERLAP_S}s)"
    overlap_rc=0
    timeout --kill-after=20 "$OVERLAP_S" "$PY" -m bench.trainer_vs_trl "${TRAINING_ARGS[@]}" \
      --parts overlap --out "$WORK/training.json" || overlap_rc=$?
  else
    echo ">> 2b. overlap skipped: ${OVERLAP_S}s of the budget left" >&2
    overlap_rc=124  # recorded as out of time
  fi
fi

echo ">> 3. report"
RLHF_BENCH_ROLE="gpu_check.sh report" \
  "$PY" - "$WORK" "$OUT" "$services_rc" "$training_rc" "$overlap_rc" "$BUDGET_S" \
  "$((SECONDS - STARTED))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
from bench.run import write_result

work, out, services_rc, training_rc, overlap_rc, budget_s, wall_s = sys.argv[1:]
work = Path(work)

def read(name):
    path = work / name
    return json.loads(path.read_text()) if path.exists() else {}

def rc(value):
    return None if value == "skipped" else int(value)

tests = {}
if (work / "services.xml").exists():
    for case in ET.parse(work / "services.xml").getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
        tests[case.get("name")] = outcome
services, training = read("services.json"), read("training.json")
peaks = {f"services: {k}": v for k, v in services.pop("peak_rss_mb", {}).items()}
peaks.update({f"training: {k}": v for k, v in training.pop("peak_rss_mb", {}).items()})
steps = {"services": rc(services_rc), "training": rc(training_rc), "overlap": rc(overlap_rc)}
result = {
    "passed": all(v in (0, None) for v in steps.values())
    and bool(tests) and all(v == "passed" for v in tests.values()),
    "exit_codes": steps,
    "timed_out": [k for k, v in steps.items() if v in (124, 137)],
    "tests": tests,
    "services": services,
    "generation": services.get("generation"),
    "training": {
        k: training.get(k)
        for k in ("learner_ratio_vs_trl", "learner_ratio_vs_trl_median", "learner_cpu_ratio_vs_trl",
                  "inprocess_end_to_end_ratio_vs_trl", "trl_samples_per_s_end_to_end",
                  "overlap_gain", "overlap_samples_per_s", "sides", "config", "trl_version")
    },
    "learner_ratio_vs_trl": training.get("learner_ratio_vs_trl"),
    "overlap_gain": training.get("overlap_gain"),
    "budget_s": int(budget_s),
    "wall_s": int(wall_s),
    "peak_rss_mb": peaks,
}
print(json.dumps({k: result[k] for k in ("passed", "exit_codes", "tests", "learner_ratio_vs_trl",
                                         "overlap_gain", "wall_s")}, indent=2))
print(f"wrote {write_result('gpu_check', result, Path(out))}")
sys.exit(0 if result["passed"] else 1)
EOF

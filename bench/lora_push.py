"""LoRA push against a full push: bytes per push and push time of SmolLM2-135M (rank 16 on
q/k/v/o) into a running policy service, same run, same service.

    python -m bench.lora_push [--rounds 3]    # writes bench/results/lora_push.json

Both versions come from one LoRA learner, as the trainer writes them: the adapter alone
(weights_push.write_adapter_version, what a LoRA run pushes) and its merged weights as a full
model.safetensors (write_version, what the same run would push without LoRA). The pusher is its
own process (the trainer's), and a push is timed from its start until UpdateWeights returns, which
the policy does only after the checks and the swap; for the adapter that includes merging it into
the base (reported on its own as `lora_merge_s`: the targeted weights written, the untouched
ones linked from a shard written once; services/policy/lora.merge_folder). The two alternate round by round; the first
KEEP_VERSIONS pushes (which write fresh files rather than recycling a pruned version's) are left
out of the medians.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import shutil
import statistics
import time
from pathlib import Path

import torch

from bench.run import write_result
from deploy.local.triton import TritonServer
from services.common.digest import BLAKE3
from services.common.grpc_server import GrpcSettings
from services.common.models import convert_smollm2
from services.common.settings import TritonSettings
from services.policy.server import PolicyService
from services.policy.settings import PolicySettings
from services.policy.weights import KEEP_VERSIONS
from services.trainer.learner import Learner, LearnerConfig
from services.trainer.weights_push import write_adapter_version, write_version

# The pusher is an authenticated caller of UpdateWeights; both processes read this token.
os.environ.setdefault("RLHF_CONTROL_TOKEN", secrets.token_urlsafe(24))
REPO = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def pusher(conn, address: str) -> None:
    """Child process: for each (folder, version) received, the trainer's push of that folder;
    sends back (accepted, reason, bytes sent, seconds)."""
    from services.trainer.weights_push import build_manifest, push_all

    while (order := conn.recv()) is not None:
        folder, version = order
        manifest = build_manifest(Path(folder), version, (BLAKE3,))
        start = time.perf_counter()
        (result,) = push_all([address], Path(folder), manifest, skip_current=False)
        conn.send((result.accepted, result.reason, result.bytes_sent, time.perf_counter() - start))


def versions(model_dir: Path, work: Path, rank: int) -> tuple[Path, Path, dict]:
    """(adapter folder, full folder, timings): one LoRA learner's adapter, its adapters moved
    off peft's zero start as training moves them, and the same weights merged."""
    learner = Learner(
        LearnerConfig(algorithm="grpo", lora_rank=rank, lora_alpha=2.0 * rank,
                      lora_target_modules=TARGETS),
        model_dir,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in learner.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
    start = time.perf_counter()
    adapter = write_adapter_version(work / "lora", 1, *learner.adapter_push(base_version=1))
    lora_write_s = time.perf_counter() - start
    start = time.perf_counter()
    full = write_version(work / "full", 1, learner.policy_state_dict(), (BLAKE3,))
    full_write_s = time.perf_counter() - start
    del learner
    return adapter, full, {"lora_write_s": lora_write_s, "full_write_s": full_write_s}


def measure(model_dir: Path, rounds: int, rank: int = 16) -> dict:
    state = REPO / ".local" / "bench" / f"lora-push-{os.getpid()}"
    triton = TritonServer(state_dir=state / "triton", model_repository=state / "model-repository")
    (state / "model-repository").mkdir(parents=True, exist_ok=True)
    service = None
    try:
        adapter, full, writes = versions(model_dir, state, rank)
        triton.start()
        settings = PolicySettings(
            model_dir=model_dir,
            weights_root=state / "weights",
            model_repository=state / "model-repository",
            grpc=GrpcSettings(host="127.0.0.1", port=0, metrics_port=0),
            triton=TritonSettings(url=triton.grpc_url, timeout_s=600),
            log_generations=False,
            follow_weights_topic=False,
        )
        service = PolicyService.launch(settings)
        updater = service.servicer.updater
        spawn = multiprocessing.get_context("spawn")
        parent, child = spawn.Pipe()
        process = spawn.Process(target=pusher, args=(child, service.address))
        process.start()

        def push_once(folder: Path) -> tuple[int, float]:
            parent.send((str(folder), updater.version + 1))
            accepted, reason, sent, seconds = parent.recv()
            assert accepted, reason
            return sent, seconds

        runs: dict[str, list] = {
            "lora": [],
            "full": [],
            "merge": [],
            "lora_phases": [],
            "full_phases": [],
        }
        sizes = {}
        for round_ in range(rounds + (KEEP_VERSIONS + 1) // 2):
            for kind, folder in (("lora", adapter), ("full", full)):
                sizes[kind], seconds = push_once(folder)
                if round_ < (KEEP_VERSIONS + 1) // 2:
                    continue  # cold: fresh files
                runs[kind].append(seconds)
                runs[f"{kind}_phases"].append(dict(updater.last_timings))
                if kind == "lora":
                    runs["merge"].append(updater.last_merge_s)
        parent.send(None)
        process.join(timeout=60)
    finally:
        if service is not None:
            service.stop(grace_s=1)
        triton.stop()
        shutil.rmtree(state, ignore_errors=True)
    median = statistics.median
    return {
        "model": model_dir.name,
        "lora_rank": rank,
        "lora_target_modules": list(TARGETS),
        "rounds": rounds,
        "lora_bytes": sizes["lora"],
        "full_bytes": sizes["full"],
        "bytes_ratio": sizes["lora"] / sizes["full"],
        "lora_push_s": median(runs["lora"]),
        "full_push_s": median(runs["full"]),
        "push_time_ratio": median(runs["lora"]) / median(runs["full"]),
        "lora_push_runs_s": runs["lora"],
        "full_push_runs_s": runs["full"],
        "lora_merge_s": median(runs["merge"]),
        "lora_merge_runs_s": runs["merge"],
        "lora_service_phases_s": runs["lora_phases"],
        "full_service_phases_s": runs["full_phases"],
        **writes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    opts = parser.parse_args()
    convert_smollm2(opts.model_dir)
    result = measure(opts.model_dir, opts.rounds, opts.rank)
    write_result("lora_push", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

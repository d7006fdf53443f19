"""`make up` / `make down`: the whole platform on this machine, left running for a person to try.

    make up      # broker, Triton, policy/reward/reference/judge services, gateway, curator,
                 # refresh, rollout worker and trainer; prints the chat page, the OpenAI base URL
                 # and key, and the judge's address (`rlhf label-ai --judge ADDRESS`)
    make down    # stops all of it

It serves the models the last `make demo` trained (models/demo/sft and models/demo/reward, kept
there by the demo); the trainer keeps improving the policy from them, forever, while people chat
and press thumbs on the chat page. State, logs and pid files are under .local/platform/;
`.local/platform/env` holds OPENAI_BASE_URL and OPENAI_API_KEY for the openai client.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deploy.local.stack import REPO_ROOT, Stack

STATE = REPO_ROOT / ".local" / "platform"
DEMO_MODELS = REPO_ROOT / "models" / "demo"
DATA = REPO_ROOT / "deploy" / "local" / "data"


def up(argv: list[str] | None = None) -> int:
    from deploy.local.demo import PRESETS, fast_dtype, read_jsonl, write_jsonl

    parser = argparse.ArgumentParser(prog="make up", description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", choices=["ppo", "grpo", "rloo"], default="ppo")
    parser.add_argument(
        "--models", type=Path, default=DEMO_MODELS, help="folder with sft/ and reward/"
    )
    parser.add_argument("--state", type=Path, default=STATE)
    options = parser.parse_args(argv or [])
    state = options.state
    sft, reward = options.models / "sft", options.models / "reward"
    if not (sft / "model.safetensors").exists() or not (reward / "model.safetensors").exists():
        print(
            f"make up serves the models `make demo` trains ({sft}, {reward}); run `make demo` "
            "(or `make demo PRESET=quick`, about 6 minutes) first",
            file=sys.stderr,
        )
        return 2
    if Stack.alive_in(state):
        print(
            f"the platform already runs ({', '.join(Stack.alive_in(state))}); `make down` stops it",
            file=sys.stderr,
        )
        return 1
    preset = PRESETS["default"]
    stack = Stack(state, dtype=fast_dtype(), threads=max(1, (os.cpu_count() or 2) // 2))
    try:
        stack.start_core()
        stack.start_policy(sft)
        stack.start_reward(reward, state / "reward-versions")
        stack.start_reference(sft)
        stack.wait_serving(("policy", "reward", "reference"))
        # The judge labels through the policy's own model (no second copy in memory); its AI
        # labels and unsure pairs go to Kafka like every other preference.
        stack.start_judge(
            sft, policy_address=stack.address("policy"), annotation_max_confidence=0.2
        )
        stack.wait_serving(("judge",))
        stack.start_gateway()
        stack.start_curator()
        stack.start_refresh(reward, state / "reward-versions", **preset.refresh)
        batch = preset.prompts_per_step * preset.samples_per_prompt
        stack.start_trainer(sft, options.algorithm, batch, 0, preset.learner)
        prompts = write_jsonl(
            state / "rl-prompts.jsonl",
            [
                {"messages": [{"role": "user", "content": r["prompt"]}]}
                for r in read_jsonl(DATA / "prompts_train.jsonl")
            ],
        )
        stack.start_rollout(
            prompts,
            preset.samples_per_prompt,
            preset.prompts_per_step,
            preset.max_new_tokens,
            0,
            live_prompt_fraction=0.25,
            rollouts_per_version=batch,  # a batch per version: the next one beside the update
        )
    except BaseException:
        stack.stop()
        Stack.stop_folder(state)
        raise
    env = stack.write_env()
    urls = {
        "chat page": f"{stack.gateway_url}/",
        "OpenAI base URL": f"{stack.gateway_url}/v1",
        "API key": stack.api_key,
        "judge (gRPC JudgeService)": stack.address("judge"),
        "metrics": {
            n: f"http://127.0.0.1:{p}/metrics"
            for n, p in stack.ports.items()
            if n.endswith("-metrics")
        },
        "env file": str(env),
    }
    (state / "urls.json").write_text(json.dumps(urls, indent=1))
    print("the platform is up:")
    for name, value in urls.items():
        if isinstance(value, dict):
            for service, url in value.items():
                print(f"  {'metrics ' + service.removesuffix('-metrics'):24s} {url}")
        else:
            print(f"  {name:24s} {value}")
    print("  stop it with `make down`; logs are under .local/platform/")
    return 0


def down(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make down")
    parser.add_argument("--state", type=Path, default=STATE)
    stopped = Stack.stop_folder(parser.parse_args(argv or []).state)
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0

"""The RL learner's configuration: one dataclass, a one-line docstring under every field.

Fields left as None take the chosen algorithm's default (see services/trainer/algorithms/spec.py):
PPO puts a k1 KL penalty in the reward and whitens advantages; GRPO puts k3 KL in the loss;
RLOO puts k1 in the reward.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.trainer.algorithms import (
    ALGORITHMS,
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    KL_PLACEMENT,
)


@dataclass
class LearnerConfig:
    """The learner's algorithm and hyperparameters; the Kafka loop builds it from
    `TrainerSettings` (algorithm, seed, and the RLHF_TRAINER_LEARNER JSON for the rest)."""

    algorithm: str = "ppo"
    """Registered algorithm name: ppo, grpo or rloo."""
    lr: float = 1e-5
    """AdamW learning rate (after warmup)."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to `lr`; constant afterwards."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_low: float = 0.2
    """PPO ratio clip below 1: ratios under 1 - clip_low are clipped."""
    clip_high: float = 0.2
    """PPO ratio clip above 1 (raise it for DAPO's clip-higher)."""
    value_clip: float = 0.2
    """Value clipping range around the values recorded before the update."""
    value_coef: float = 0.1
    """Weight of the value loss in the total loss (the value head shares the policy's trunk)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    kl_coef: float = 0.05
    """Initial (or fixed) KL coefficient beta."""
    kl_mode: str | None = None
    """Where KL to the reference goes: reward, loss or none; None: the algorithm's default."""
    kl_estimator: str | None = None
    """Per-token KL estimator k1, k2 or k3; None: k1 in the reward, k3 in the loss."""
    kl_control: str = "fixed"
    """KL coefficient controller: fixed, or adaptive (Ziegler et al.)."""
    target_kl: float = 6.0
    """Adaptive controller: target sequence KL (nats, summed over the response)."""
    kl_horizon: float = 10_000.0
    """Adaptive controller: horizon in samples over which the coefficient adapts."""
    kl_budget: float | None = None
    """Hard KL budget (nats per token, mean over the batch's response tokens, policy after the
    step vs the rollouts' reference log-probs): a step that ends over it is undone (parameters,
    optimizer and scheduler restored) and counted. None: no budget."""
    kl_budget_estimator: str = "k3"
    """Per-token KL estimator the budget is measured with (k3: non-negative, low variance)."""
    uncertainty_penalty: float = 0.0
    """k: the learner optimises reward - k * reward_spread (the ensemble's disagreement)."""
    length_penalty: float = 0.0
    """Subtracted from the reward per response token (after `length_normalise`)."""
    length_normalise: bool = False
    """Divide the reward by the response's token count (a per-token reward); with negative
    rewards this favours long answers, so prefer `length_penalty` there."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool | None = None
    """Whiten advantages over the batch; None: the algorithm's default."""
    grpo_norm_by_std: bool = True
    """GRPO: divide by the group's std (False is Dr. GRPO's mean-only baseline)."""
    value_head: bool | None = None
    """Train a value head on the last hidden state; None: only if the algorithm has a critic."""
    ppo_epochs: int = 1
    """Passes over each batch of rollouts."""
    minibatch_size: int | None = None
    """Samples per optimizer step; None: the whole batch in one step per epoch."""
    micro_batch_size: int | None = None
    """Samples per forward/backward (gradient accumulation); None: the whole minibatch."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables it)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed on logits / temperature to match."""
    seed: int = 0
    """Seed for the value head's initialisation and minibatch shuffling."""
    device: str = "auto"
    """Torch device: auto (CUDA when present) or an explicit device string."""
    dtype: str = "auto"
    """Autocast dtype: auto is bf16 on CUDA, float32 on CPU; master weights stay float32."""
    lora_rank: int = 0
    """LoRA rank r: train peft LoRA adapters on a frozen base instead of every weight; 0: off."""
    lora_alpha: float = 16.0
    """LoRA alpha; the adapter's update B @ A is scaled by lora_alpha / lora_rank."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Names of the Linear modules that get adapters (peft's target_modules)."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input, in the loss's forward passes only (0 keeps the trainer's
    log-probs equal to the sampler's)."""

    def validate(self) -> LearnerConfig:
        """Raises ValueError naming the first bad field; returns self."""
        ALGORITHMS.get(self.algorithm)
        KL_CONTROLLERS.get(self.kl_control)
        modes = [mode.value for mode in KL_PLACEMENT]
        if self.kl_mode is not None and self.kl_mode not in modes:
            raise ValueError(f"unknown kl_mode {self.kl_mode!r}; known: {', '.join(modes)}")
        if self.kl_estimator is not None:
            KL_ESTIMATORS.get(self.kl_estimator)
        KL_ESTIMATORS.get(self.kl_budget_estimator)
        if self.kl_budget is not None and not self.kl_budget > 0:
            raise ValueError(f"kl_budget must be > 0 or None, got {self.kl_budget}")
        positive = {"lr": self.lr, "temperature": self.temperature, "ppo_epochs": self.ppo_epochs}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        non_negative = {
            "clip_low": self.clip_low,
            "clip_high": self.clip_high,
            "value_clip": self.value_clip,
            "kl_coef": self.kl_coef,
            "max_grad_norm": self.max_grad_norm,
            "lr_warmup_steps": self.lr_warmup_steps,
            "uncertainty_penalty": self.uncertainty_penalty,
            "length_penalty": self.length_penalty,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"gamma and lam must lie in [0, 1], got {self.gamma}, {self.lam}")
        if self.clip_low >= 1.0:
            raise ValueError(f"clip_low must be < 1, got {self.clip_low}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.lora_rank and not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module")
        for name in ("minibatch_size", "micro_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        return self

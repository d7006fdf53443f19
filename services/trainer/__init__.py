"""The RL trainer: consumes rollouts from Kafka, updates the policy, pushes weights back.

Three parts, each usable without the one after it:
  1. the algorithms (algorithms/): pure functions of tensors (advantages, policy and value
     losses, KL estimators and controllers) registered by name, and an `AlgorithmSpec` per
     algorithm (PPO, GRPO, RLOO);
  2. the learner (learner.py, config.py, rollouts.py): `Learner(LearnerConfig(...)).step(samples)`
     is one RL update from a batch of scored rollouts, in-process, no Kafka;
  3. the Kafka loop (loop.py, consumer.py, checkpoint.py, weights_push.py, metrics.py,
     settings.py, server.py): rollouts from Kafka into the learner, checkpoints and offsets,
     weights pushed to the policy replicas; `python -m services.trainer` runs it.
distributed.py holds every torch.distributed collective that parts 2 and 3 make.
"""

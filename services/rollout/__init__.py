"""The rollout worker: prompts -> policy -> reward + reference -> Kafka `rlhf.rollouts.v1`."""

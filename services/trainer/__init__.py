"""The RL trainer: consumes rollouts from Kafka, updates the policy, pushes weights back."""

"""The reward service: gRPC scoring in front of the reward model running inside Triton."""

"""The reference service: per-token log-probs of the frozen reference model, inside Triton."""

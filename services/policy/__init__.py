"""The policy service: gRPC generation in front of the policy model running inside Triton."""

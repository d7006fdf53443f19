"""The FastAPI gateway: product-facing chat completions and the feedback endpoints."""

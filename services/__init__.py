"""The RLHF platform's services, one package each, and the plumbing they share (`services.common`)."""

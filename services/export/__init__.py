"""`rlhf export`: what the platform collected, out to the files the ecosystem reads."""

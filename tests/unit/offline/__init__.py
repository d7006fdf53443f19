"""Tests of the offline training stages (services/trainer/offline) and the `rlhf` CLI."""

"""Tests of the offline training stages (services/common/training) and the `rlhf` CLI."""

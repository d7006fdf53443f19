"""Tests of `rlhf eval` (services/eval): its statistics, the stage and its command line."""

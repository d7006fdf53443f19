"""Plumbing every service shares: settings, logging, Kafka, Triton, model loading, metrics.

Written once here so that no service carries its own copy.
"""

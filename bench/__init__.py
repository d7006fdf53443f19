"""Benchmarks: each module measures a figure against a baseline run in the same process or script
and writes bench/results/<name>.json; `python -m bench.run` (make bench) runs them all and prints
the table the README carries."""

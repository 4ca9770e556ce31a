"""Benchmarks of embconstraint against the other ways of pinning embedding rows.

Run ``python benchmarks/step_time.py --help`` (see benchmarks/README.md).
"""

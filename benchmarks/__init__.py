"""Benchmarks of embconstraint against the other ways of pinning embedding rows.

Each benchmark is a module run from the repository root as ``python -m benchmarks.NAME``
(``--help`` for its options); they share :mod:`benchmarks.harness`. See benchmarks/README.md.
"""

"""Pallas kernels, installed as ``sparsejax.kernels`` (see pyproject's package-dir).

One file per kernel, each with its public wrapper and a pure-JAX ``*_reference``.
"""

"""``make bench``: the worker against the floors of its own pipeline, on the real broker.

Each system runs in its own OS process, on fresh topics and a fresh group, interleaved
round-robin within each scenario. See :mod:`tests.bench.main` for the figures and the
output, :mod:`tests.bench.systems` for the systems measured.
"""

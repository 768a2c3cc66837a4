"""prefcore microbenchmarks: fused ops vs the eager reference vs the compiled reference.

Run with ``python -m bench`` (or ``make bench``); see :mod:`bench.harness`.
"""

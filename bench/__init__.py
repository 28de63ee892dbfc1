"""pigeon.bench: benchmark harnesses.

Micro-benchmarks of the I/O-free core run under pytest-benchmark
(``pytest bench/ --benchmark-enable``); ``python -m pigeon.bench.summarize``
turns their JSON into the table in the README.
"""

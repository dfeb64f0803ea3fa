"""Benchmarks of hessops against its peers; run with ``python -m benchmarks.run``."""

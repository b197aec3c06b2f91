"""Benchmarks of cachesvc: the side-by-side run (``python -m bench.run``), the soak
(``python -m bench.soak``) and a Locust file for load-testing a deployment.

Not part of the installed package: run from the repository root. See bench/README.md.
"""

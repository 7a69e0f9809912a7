"""The proxy's benchmarks: ``python -m bench <command>`` (bench/README.md); `make bench` runs
``python -m bench run``."""

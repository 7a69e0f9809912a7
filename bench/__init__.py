"""Loopback load test of the proxy: `make bench` runs `python -m bench.run`."""

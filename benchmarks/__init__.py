"""Benchmarks: each module runs as a script and prints one JSON line; importable so that tests can check their helpers."""

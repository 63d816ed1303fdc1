"""Benchmarks (``python -m benchmarks NAME``): numbers users compare us by, printed as ratios.

These machines are noisy, so every benchmark measures the things it compares side by
side in one process and prints ratios; absolute seconds are for context only. The
results, with the exact commands, live in BENCHMARKS.md. Benchmarks are not tests:
the test suite only checks that each benchmark's code path runs.
"""

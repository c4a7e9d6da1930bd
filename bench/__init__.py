"""Benchmarks: one command each, run by hand or by `./dev bench`, not by the test suite."""

"""Benchmarks run by ``make bench``: each module measures and reports, none asserts."""

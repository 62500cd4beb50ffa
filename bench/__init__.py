"""Benchmarks (``make bench``): side-by-side timings against the design's targets, never timed unit tests."""

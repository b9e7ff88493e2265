"""Measuring: image metrics, quality evaluation against a reference, speed/memory benchmarks."""

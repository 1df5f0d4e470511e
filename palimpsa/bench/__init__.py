"""Benchmarks: kernel speed of the Palimpsa op on a GPU (``palimpsa bench ops``)."""

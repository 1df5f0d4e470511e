"""Benchmarks: kernel speed on GPU (`palimpsa bench ops`) and the PyTorch path on CPU (`palimpsa bench cpu`)."""

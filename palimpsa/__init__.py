"""Palimpsa: Bayesian metaplastic attention."""

__version__ = "0.1.0"

from palimpsa.ops import chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa  # noqa: E402
import palimpsa.models  # registers the Auto classes  # noqa: E402,F401

__all__ = ["chunk_palimpsa", "fused_recurrent_palimpsa", "naive_palimpsa", "__version__"]

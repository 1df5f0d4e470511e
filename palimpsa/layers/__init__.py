"""Token-mixing layers built on the Palimpsa op."""

from palimpsa.layers.meta_mamba2 import MetaMamba2, MetaMamba2LayerCache  # noqa: F401

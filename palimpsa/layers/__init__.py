"""Token-mixing layers built on the Palimpsa op."""

from palimpsa.layers.meta_mamba2 import MetaMamba2, MetaMamba2LayerCache  # noqa: F401
from palimpsa.layers.palimpsa import Palimpsa  # noqa: F401
from palimpsa.layers.modules import RecurrentLayerCache  # noqa: F401

"""Token-mixing layers: Palimpsa and Meta-Mamba2 (built on the Palimpsa op) and the Gated DeltaNet baseline."""

from palimpsa.layers.gated_deltanet import GatedDeltaNet  # noqa: F401
from palimpsa.layers.meta_mamba2 import MetaMamba2, MetaMamba2LayerCache  # noqa: F401
from palimpsa.layers.modules import RecurrentLayerCache  # noqa: F401
from palimpsa.layers.palimpsa import Palimpsa  # noqa: F401

"""Metaplastic conversion: make a trained Mamba2 (or NotPalimpsa) metaplastic without changing its outputs.

    from palimpsa.convert import mamba2_to_meta_mamba2, convert_checkpoint
    meta = mamba2_to_meta_mamba2("path/to/mamba2")           # a MetaMamba2ForCausalLM, same logits
    convert_checkpoint("mamba2", "path/to/mamba2", "out/")   # what `palimpsa convert mamba2 SRC DST` does
"""

from palimpsa.convert.checkpoint import CONVERTERS, convert_checkpoint
from palimpsa.convert.mamba2 import mamba2_to_meta_mamba2
from palimpsa.convert.metaplastic import CONVERTED_IMPORTANCE_SCALE, gate_gradients, relative_logits_change
from palimpsa.convert.notpalimpsa import notpalimpsa_to_palimpsa

__all__ = ["mamba2_to_meta_mamba2", "notpalimpsa_to_palimpsa", "convert_checkpoint", "CONVERTERS",
           "CONVERTED_IMPORTANCE_SCALE", "relative_logits_change", "gate_gradients"]

"""The Palimpsa op: one signature, several backends.

``naive_palimpsa`` is the readable ground truth; ``chunk_palimpsa`` (training) and
``fused_recurrent_palimpsa`` (decoding, short inputs) are the fast paths, tested against it.
"""

from palimpsa.ops.chunk import chunk_palimpsa
from palimpsa.ops.fused_recurrent import fused_recurrent_palimpsa
from palimpsa.ops.naive import naive_palimpsa
from palimpsa.ops.step import palimpsa_step

__all__ = ["naive_palimpsa", "chunk_palimpsa", "fused_recurrent_palimpsa", "palimpsa_step"]

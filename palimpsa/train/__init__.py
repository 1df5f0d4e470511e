"""Language-model training: packed variable-length batches, exact resume, DDP/FSDP2 through torchrun.

    from palimpsa.train import TrainConfig, train
    train(TrainConfig(model="palimpsa-tiny", data=["corpus/"], seq_len=512, max_steps=100))
"""

from palimpsa.train.config import TrainConfig
from palimpsa.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]

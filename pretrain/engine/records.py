"""The DeepSpeed classes its checkpoint files hold, for the weights-only loader's allow-list.

Kept apart from the rest of the engine so ``pretrain.checkpoint.safeload`` can ask for them without
importing the engine; DeepSpeed itself is imported only when they are asked for.
"""

from __future__ import annotations


def checkpoint_record_classes() -> list:
    """The classes (besides torch's defaults) that DeepSpeed's checkpoint files contain.

    Measured on checkpoints of every layout the tests cover: the fragment addresses of ZeRO-1/2 and
    BF16_Optimizer partitions, ZeRO-3's stage enum and its (static) loss scaler. Each is a plain
    record rebuilt from its fields; none runs code on construction.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]

"""The distributed runtime: trains any `Stage` on Ray Train workers with DeepSpeed engines, EMA, committed
checkpoints on any storage URL, preemption handling and telemetry; plus a single-process loop for tests.

Ray and DeepSpeed are imported only when a distributed run starts, so the single-process pieces stay light.
"""
from .checkpoint import CheckpointMismatch, CheckpointRef, CheckpointStore, load_export
from .drivers import DeepSpeedDriver, PlainDriver, build_optimizer, deepspeed_config
from .ema import Ema
from .single import LoopResult, train_single_process
from .source import BatchSource, DataFactory, DataRequest
from .trainer import TrainResult, train_stage

__all__ = [
    "BatchSource", "CheckpointMismatch", "CheckpointRef", "CheckpointStore", "DataFactory", "DataRequest",
    "DeepSpeedDriver", "Ema", "LoopResult", "PlainDriver", "TrainResult", "build_optimizer", "deepspeed_config",
    "load_export", "train_single_process", "train_stage",
]

"""The training engine: the exact-resume trainer, checkpoints, atomic file io and torchrun helpers.
It knows nothing about flows."""

from rectflow.engine.io import atomic_path, save_json, load_json, save_tensors, load_tensors, sha256_file, append_jsonl, read_jsonl
from rectflow.engine.distributed import DistInfo, env_world_size, planned_world_size, init_from_env, info, is_distributed, is_main_process, barrier, check_divisible, rank_slice, slice_batch, rank_shards, all_reduce_mean, destroy
from rectflow.engine.checkpoint import CHECKPOINT_FORMAT, Checkpoint, checkpoint_path, list_checkpoints, latest_checkpoint, save_checkpoint, read_checkpoint, load_weights, load_optimizer_state
from rectflow.engine.trainer import TrainConfig, EMA, Trainer, TimeBudget, step_generator, resolve_device, lr_at

__all__ = [
    "atomic_path",
    "save_json",
    "load_json",
    "save_tensors",
    "load_tensors",
    "sha256_file",
    "append_jsonl",
    "read_jsonl",
    "DistInfo",
    "env_world_size",
    "planned_world_size",
    "init_from_env",
    "info",
    "is_distributed",
    "is_main_process",
    "barrier",
    "check_divisible",
    "rank_slice",
    "slice_batch",
    "rank_shards",
    "all_reduce_mean",
    "destroy",
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "read_checkpoint",
    "load_weights",
    "load_optimizer_state",
    "TrainConfig",
    "EMA",
    "Trainer",
    "TimeBudget",
    "step_generator",
    "resolve_device",
    "lr_at",
]

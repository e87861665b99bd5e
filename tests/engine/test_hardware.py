"""precision auto and thread splitting: the hardware facts behind the speed defaults (issue 29)."""

import warnings

import pytest
import torch

from rectflow.data import make_distribution
from rectflow.engine import hardware
from rectflow.engine.hardware import precision_note, resolve_precision, resolve_threads, torch_threads
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.errors import ConfigError
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.models import MLPVelocity


def _trainer(**kw):
    torch.manual_seed(0)
    obj = FlowMatchingObjective(IndependentCoupling(make_distribution("gaussian"), make_distribution("moons")))
    return Trainer(MLPVelocity(2, width=8, depth=2), obj, TrainConfig(steps=2, batch_size=8, progress=False, ema_decay=0.0, **kw))


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": native)
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32" and resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert _trainer().precision == ("bf16" if native else "fp32")
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision("fp16", torch.device("cpu"))


def test_explicit_bf16_on_a_cpu_without_native_bf16_runs_with_one_warning(monkeypatch):
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": False)
    assert "emulated" in precision_note("bf16", "cpu") and precision_note("fp32", "cpu") is None
    with pytest.warns(UserWarning, match="emulated and many times slower"):
        tr = _trainer(precision="bf16")
    assert tr.precision == "bf16"
    tr.fit()
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trainer(precision="bf16")  # native: no warning


def test_threads_split_the_cores_between_ranks_and_workers():
    assert resolve_threads(None, cores=8, local_world_size=1) == 8
    assert resolve_threads(None, cores=8, local_world_size=2) == 4
    assert resolve_threads(None, cores=8, local_world_size=2, workers=2) == 3  # a core left to the DataLoader workers
    assert resolve_threads(None, cores=2, local_world_size=2, workers=1) == 1  # never below one
    assert resolve_threads(3, cores=8) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="train.threads"):
            resolve_threads(bad)
    with pytest.raises(ConfigError, match="threads must be an integer"):
        TrainConfig(threads=0).validate()


def test_the_trainer_trains_at_its_thread_count_and_restores_the_processs():
    old = torch.get_num_threads()
    seen = []
    tr = _trainer(threads=1)
    tr.callbacks = [lambda t, step: seen.append(torch.get_num_threads())]
    with torch_threads(2):
        tr.fit()
        assert torch.get_num_threads() == 2  # the caller's count is back after fit
    assert seen == [1, 1] and torch.get_num_threads() == old
    with torch_threads(1):
        assert _trainer().threads == 1  # auto never raises the process's own count


def test_under_torchrun_each_rank_takes_its_share_of_the_cores(monkeypatch):
    """torchrun pins every rank to 1 OpenMP thread; auto gives each of the machine's ranks cores // LOCAL_WORLD_SIZE instead."""
    monkeypatch.setattr(hardware, "usable_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with torch_threads(1):
        assert _trainer().threads == 4
        assert _trainer(workers=1).threads == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with torch_threads(1):
        assert _trainer().threads == 1  # alone: never above the caller's own count

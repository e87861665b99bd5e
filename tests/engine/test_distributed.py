"""Data-parallel training: N gloo processes with global batch B take the same steps as one process
with batch B; only rank 0 writes; bad world sizes are refused.  (CPU, 2 processes.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rectflow.data import Gaussian, Moons, make_distribution
from rectflow.engine import distributed
from rectflow.engine.distributed import check_divisible, rank_shards, rank_slice, slice_batch
from rectflow.engine.io import load_tensors, read_jsonl, save_tensors
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.errors import ConfigError
from rectflow.flow.couplings import MinibatchOTCoupling
from rectflow.flow.losses import FlowBatch, FlowMatchingObjective
from rectflow.images.conditional import ConditionalFlowMatchingObjective, LabelledCoupling
from rectflow.models import MLPVelocity, UNetVelocity

ROOT = Path(__file__).resolve().parents[2]


def test_slicing_helpers():
    assert check_divisible(12, 3) == 4 and rank_slice(12, 2, 3) == slice(8, 12)
    with pytest.raises(ConfigError, match="batch_size 10 is not divisible by the world size 4"):
        check_divisible(10, 4)
    b = FlowBatch(torch.arange(8), torch.arange(8) * 2, torch.arange(8.0))
    parts = [slice_batch(b, r, 2) for r in range(2)]
    assert isinstance(parts[0], FlowBatch) and torch.equal(torch.cat([p.x1 for p in parts]), b.x1)
    assert slice_batch({"a": torch.arange(4), "s": 3}, 1, 2)["a"].tolist() == [2, 3]
    shards = [list(rank_shards(10, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and shards[1] == [1, 4, 7]


def _trainer(kind: str, run_dir, batch: int = 16, steps: int = 6) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-2, log_every=3, ckpt_every=3, progress=False, seed=3, ema_decay=0.9, workers=0,
                      precision="fp32")  # DDP equals one process to float32 rounding; bf16 autocast would round per rank
    if kind == "mlp":  # minibatch OT: a batch-level coupling, drawn globally, then sliced
        return Trainer(MLPVelocity(2, width=32, depth=2), FlowMatchingObjective(MinibatchOTCoupling(Gaussian(2), Moons())), cfg, run_dir)
    source, target = make_distribution({"name": "gaussian", "shape": [1, 8, 8]}), make_distribution({"name": "digits", "flip": True})
    model = UNetVelocity(1, 8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), head_channels=8, dropout=0.0, num_classes=10)
    return Trainer(model, ConditionalFlowMatchingObjective(LabelledCoupling(source, target), p_uncond=0.3), cfg, run_dir)


def _weights(tr: Trainer) -> dict:
    out = {f"model.{k}": v.detach().clone() for k, v in tr.model.state_dict().items()}
    out.update({f"ema.{k}": v.detach().clone() for k, v in tr.ema.model.state_dict().items()})
    return out


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for kind in ("mlp", "unet"):
            tr = _trainer(kind, Path(out) / kind).fit()
            if rank == 0:
                save_tensors(Path(out) / f"{kind}.safetensors", _weights(tr))
        try:
            _trainer("mlp", None, batch=15)
        except ConfigError as e:
            (Path(out) / f"error_{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for kind in ("mlp", "unet"):
        init = {f"model.{k}": v.clone() for k, v in _trainer(kind, None).model.state_dict().items()}
        ref = _trainer(kind, tmp_path / f"ref_{kind}").fit()
        want = _weights(ref)
        got, _ = load_tensors(tmp_path / f"{kind}.safetensors")
        assert got.keys() == want.keys()
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-4), (kind, k, float((got[k] - want[k]).abs().max()))
            if k in init:  # float summation order only: the two runs' steps agree to 0.1 % of the distance moved
                moved = float((want[k] - init[k]).norm())
                assert float((got[k] - want[k]).norm()) <= 1e-3 * moved + 1e-7, (kind, k)
        # rank 0 alone wrote checkpoints and the log, each once; logged losses are global means
        run = tmp_path / kind
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003.safetensors", "step_00000006.safetensors"]
        rows, ref_rows = read_jsonl(run / "metrics.jsonl"), read_jsonl(tmp_path / f"ref_{kind}" / "metrics.jsonl")
        assert [r["step"] for r in rows] == [3, 6]
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-4)
    for rank in range(2):
        assert "not divisible by the world size 2" in (tmp_path / f"error_{rank}.txt").read_text()


@pytest.mark.slow
def test_rectflow_train_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 -m rectflow.cli train` equals the single-process command."""
    common = ["target=moons", "model.width=32", "model.depth=2", "train.steps=8", "train.batch_size=32", "train.ckpt_every=8",
              "train.log_every=4", "train.workers=0", "train.precision=fp32", "--no-eval", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    torchrun = Path(sys.executable).parent / "torchrun"
    subprocess.run([sys.executable, "-m", "rectflow.cli", "train", "-r", str(tmp_path / "one"), *common], check=True, env=env, cwd=tmp_path, timeout=300)
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "rectflow.cli", "train", "-r", str(tmp_path / "two"), *common],
                   check=True, env=env, cwd=tmp_path, timeout=300, capture_output=True)
    a, _ = load_tensors(tmp_path / "one" / "checkpoints" / "step_00000008.safetensors")
    b, _ = load_tensors(tmp_path / "two" / "checkpoints" / "step_00000008.safetensors")
    for k in a:
        if k.startswith(("model.", "ema.")):
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    bad = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "rectflow.cli", "train", "-r", str(tmp_path / "bad"),
                          *common, "train.batch_size=31"], env=env, cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert bad.returncode != 0 and "not divisible by the world size 2" in bad.stderr


def _pairs_worker(rank: int, world: int, init_file: str, out: str) -> None:
    from rectflow.reflow.pairs import PairOptions, generate_pairs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = MLPVelocity(2, width=16, depth=2)
        generate_pairs(model, Gaussian(2), out, 50, PairOptions(seed=4, shard_size=8, solver="dopri5", rtol=1e-4, atol=1e-4, device="cpu"), progress=False)
    finally:
        dist.destroy_process_group()


def test_sharded_pair_generation_equals_one_process(tmp_path):
    """Two gloo ranks writing every other shard produce byte-identical shards and the same manifest."""
    from rectflow.reflow.pairs import PairOptions, PairStore, generate_pairs

    mp.start_processes(_pairs_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two")), nprocs=2, join=True, start_method="spawn")
    torch.manual_seed(0)
    model = MLPVelocity(2, width=16, depth=2)
    generate_pairs(model, Gaussian(2), tmp_path / "one", 50, PairOptions(seed=4, shard_size=8, solver="dopri5", rtol=1e-4, atol=1e-4, device="cpu"), progress=False)
    one, two = PairStore(tmp_path / "one"), PairStore(tmp_path / "two")
    assert [e["sha256"] for e in one.manifest["shards"]] == [e["sha256"] for e in two.manifest["shards"]]
    assert [e["nfe"] for e in one.manifest["shards"]] == [e["nfe"] for e in two.manifest["shards"]]
    assert len(two) == 50 and len(one.manifest["shards"]) == 7
    z0a, z1a = one.load()
    z0b, z1b = two.load()
    assert torch.equal(z0a, z0b) and torch.equal(z1a, z1b)
    assert not list((tmp_path / "two").glob("*.nfe.json"))  # side files are cleaned up


def test_process_group_waits_long_enough_for_uneven_pair_shards(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed, "info", lambda: distributed.DistInfo())
    distributed.init_from_env(device="cpu")
    assert seen["backend"] == "gloo" and seen["timeout"] == distributed.PROCESS_GROUP_TIMEOUT
    assert distributed.PROCESS_GROUP_TIMEOUT.total_seconds() >= 3600  # NCCL's default is 10 minutes


def test_an_explicit_gpu_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match="every rank on one GPU"):
        distributed.init_from_env(device="cuda:0")

"""Pair stores (theory §4): round trip, determinism, resume after a kill, corruption and
settings checks, and the store as a coupling."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from rectflow.data import Gaussian
from rectflow.engine.trainer import step_generator
from rectflow.errors import CheckpointError, ConfigError, DataError
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.reflow.pairs import PairCoupling, PairOptions, PairStore, default_solve_batch, generate_pairs, shard_name, state_dict_sha256
from tests.conftest import gen


class Shift(nn.Module):
    """v(x, t) = c: the flow maps Z0 to Z0 + c exactly (any solver)."""

    def __init__(self, c=(1.0, -2.0)):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))
        self.dim = len(c)

    def forward(self, x, t):
        return self.c.expand_as(x)


def make(tmp_path, name="store", n=1000, shard_size=300, **kw):
    """A store of n pairs; the PairOptions fields among ``kw`` go into ``options`` (device cpu), the rest to generate_pairs."""
    kw.setdefault("progress", False)
    fields = {k: kw.pop(k) for k in ("seed", "rtol", "atol", "solve_batch") if k in kw}
    options = PairOptions(shard_size=shard_size, solver=kw.pop("solver", "euler:2"), device="cpu", **fields)
    return generate_pairs(kw.pop("model", Shift()), kw.pop("source", Gaussian(2)), tmp_path / name, n, options, **kw)


@pytest.mark.parametrize("solver", ["dpm++2m:4", "dpm++3m:4"])
def test_pairs_take_every_sampler_spec(tmp_path, solver):
    """The pairs' solver is any spec of ``rectflow.sample``: a diffusion sampler gives the same Z1 as sampling directly."""
    from rectflow.diffusion.specs import sample

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([[0.5, -0.2], [0.1, 0.3]]))

        def forward(self, x, t):
            return x @ self.a.T + t[:, None]

    model = Field()
    store = make(tmp_path, n=50, shard_size=50, model=model, solver=solver)
    z0, z1 = store.load()
    torch.testing.assert_close(z1, sample(model, z0, solver).x)
    assert json.loads((store.path / "manifest.json").read_text())["settings"]["solver"] == solver
    with pytest.raises(ConfigError, match="sigma_max"):  # EDM starts from (80/81) x0: not the pair it would store
        make(tmp_path, name="edm", n=10, shard_size=10, model=model, solver="edm:3")


def snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_round_trip(tmp_path):
    store = make(tmp_path)
    assert len(store) == 1000 and store.shape == (2,) and store.dim == 2
    man = json.loads((store.path / "manifest.json").read_text())
    assert man["complete"] and [e["n"] for e in man["shards"]] == [300, 300, 300, 100]
    assert [e["file"] for e in man["shards"]] == [shard_name(i) for i in range(4)]
    assert man["settings"]["solver"] == "euler:2" and man["settings"]["model_sha256"] == state_dict_sha256(Shift())
    assert all(e["nfe"] == 2 for e in man["shards"]) and man["stats"]["nfe_mean"] == 2
    z0, z1 = store.load()
    assert z0.shape == (1000, 2) and z0.dtype == torch.float32
    torch.testing.assert_close(z1, z0 + torch.tensor([1.0, -2.0]))
    # shard s holds the Z0 drawn from step_generator(seed, s): deterministic, independent of chunking
    torch.testing.assert_close(z0[300:600], Gaussian(2).sample(300, generator=step_generator(0, 1)))
    idx = torch.tensor([999, 0, 301, 299, 600, 5])
    a0, a1 = store.get(idx)
    torch.testing.assert_close(a0, z0[idx]) and torch.testing.assert_close(a1, z1[idx])
    b0, b1 = store[5]
    torch.testing.assert_close(b0, z0[5])
    assert [s[0].shape[0] for s in store.iter_shards()] == [300, 300, 300, 100]
    with pytest.raises(IndexError):
        store.get([1000])


def test_same_settings_same_bytes_and_rerun_is_a_no_op(tmp_path):
    a, b = make(tmp_path, "a", seed=3), make(tmp_path, "b", seed=3)
    sha = lambda s: [e["sha256"] for e in s.manifest["shards"]]  # noqa: E731
    assert sha(a) == sha(b)
    assert sha(make(tmp_path, "c", seed=4)) != sha(a)
    before = {p.name: p.stat().st_mtime_ns for p in a.path.iterdir()}
    again = make(tmp_path, "a", seed=3)
    assert sha(again) == sha(a) and {p.name: p.stat().st_mtime_ns for p in a.path.iterdir()} == before


class Kill(Exception):
    pass


def _rot_model():
    torch.manual_seed(0)
    from rectflow.models import MLPVelocity

    return MLPVelocity(2, width=16, depth=1)


def test_resume_after_kill_identity(tmp_path):
    """Kill (an exception) after 2 of 4 shards, plus a shard written but not recorded and a stale
    temporary file: the resumed store equals the uninterrupted one, with no pair lost or doubled."""
    kw = dict(model=_rot_model(), solver="dopri5")
    ref = make(tmp_path, "ref", **kw)

    def kill_after_two(s):
        if s == 1:
            raise Kill

    with pytest.raises(Kill):
        make(tmp_path, "cut", on_shard=kill_after_two, **kw)
    man = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert len(man["shards"]) == 2 and not man["complete"]
    with pytest.raises(CheckpointError, match="incomplete pair store"):
        PairStore(tmp_path / "cut")
    (tmp_path / "cut" / shard_name(2)).write_bytes(b"half-written by a killed process")  # not in the manifest
    (tmp_path / "cut" / ".pairs_00003.safetensors.abc.tmp").write_bytes(b"junk")
    resumed = make(tmp_path, "cut", **kw)
    assert [e["sha256"] for e in resumed.manifest["shards"]] == [e["sha256"] for e in ref.manifest["shards"]]
    assert not list((tmp_path / "cut").glob(".*.tmp"))
    z0a, z1a = ref.load()
    z0b, z1b = resumed.load()
    assert torch.equal(z0a, z0b) and torch.equal(z1a, z1b)
    assert torch.unique(z0b, dim=0).shape[0] == 1000  # no duplicated pairs


def test_refuses_other_settings_and_foreign_directories(tmp_path):
    make(tmp_path)
    before = snapshot(tmp_path / "store")
    for kw, key in [({"n": 900}, "n_pairs"), ({"seed": 1}, "seed"), ({"shard_size": 200}, "shard_size"), ({"solver": "euler:3"}, "solver"), ({"model": Shift((0.0, 1.0))}, "model_sha256")]:
        with pytest.raises(ConfigError, match=f"other settings.*{key}"):
            make(tmp_path, **kw)
    assert snapshot(tmp_path / "store") == before  # nothing overwritten
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        make(tmp_path, "other")
    assert snapshot(tmp_path / "other") == {"notes.txt": b"mine"}


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="integer >= 1"):
        make(tmp_path, n=0)
    with pytest.raises(ConfigError, match="shard size"):
        make(tmp_path, shard_size=0)
    with pytest.raises(ConfigError, match="unknown sampler"):
        make(tmp_path, solver="leapfrog")
    with pytest.raises(DataError, match="dimension 3 but the source pi0 has dimension 2"):
        make(tmp_path, model=Shift((1.0, 2.0, 3.0)))
    assert not (tmp_path / "store").exists()


@pytest.fixture
def store_dir(tmp_path):
    return make(tmp_path).path


def _flip_byte(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_detected(store_dir):
    _flip_byte(store_dir / shard_name(1))
    with pytest.raises(CheckpointError, match="pairs_00001.*changed on disk"):
        PairStore(store_dir)
    PairStore(store_dir, verify=False)  # sizes and layout are still consistent
    with pytest.raises(CheckpointError, match="changed on disk"):
        PairStore(store_dir, verify=False).verify()


def test_truncated_and_missing_shards_are_detected(store_dir):
    p = store_dir / shard_name(2)
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="pairs_00002.*truncated"):
        PairStore(store_dir, verify=False)
    p.unlink()
    with pytest.raises(CheckpointError, match="pairs_00002.*missing"):
        PairStore(store_dir)


def test_resume_refuses_to_overwrite_a_changed_shard(tmp_path, store_dir):
    _flip_byte(store_dir / shard_name(0))
    before = snapshot(store_dir)
    with pytest.raises(CheckpointError, match="changed on disk"):
        make(tmp_path)
    assert snapshot(store_dir) == before


@pytest.mark.parametrize(
    "edit, msg",
    [
        (lambda m: m["settings"].update(n_pairs=1300), "manifest disagrees"),
        (lambda m: m["settings"].update(shape=[3]), "shard disagrees with the manifest"),
        (lambda m: m["shards"][1].update(n=299), "manifest disagrees with its layout at shard 1"),
        (lambda m: m["shards"][3].update(sha256="0" * 64), "changed on disk"),
        (lambda m: m["shards"].pop(), "says complete but lists 3 of 4"),
        (lambda m: m["settings"].pop("seed"), "malformed pair-store manifest"),
        (lambda m: m.update(format="something-else/1"), "not a rectflow pair store"),
    ],
)
def test_manifest_that_disagrees_with_shards(store_dir, edit, msg):
    path = store_dir / "manifest.json"
    man = json.loads(path.read_text())
    edit(man)
    path.write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match=msg):
        PairStore(store_dir)


def test_unreadable_manifest(store_dir, tmp_path):
    (store_dir / "manifest.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        PairStore(store_dir)
    with pytest.raises(CheckpointError, match="not a pair store"):
        PairStore(tmp_path / "nowhere")


def test_pair_coupling(store_dir):
    store = PairStore(store_dir)
    ram, mapped = PairCoupling(store), PairCoupling(store, in_memory=False)
    a0, a1 = ram.sample(64, generator=gen(1))
    b0, b1 = mapped.sample(64, generator=gen(1))
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    torch.testing.assert_close(a1, a0 + torch.tensor([1.0, -2.0]))  # pairs stay paired
    c0, _ = ram.sample(64, generator=gen(2))
    assert not torch.equal(a0, c0)
    batch = FlowMatchingObjective(ram).draw(32, gen(0), torch.device("cpu"))
    assert batch.x0.shape == (32, 2) and batch.t.shape == (32,)
    with pytest.raises(DataError, match=r"\(dimension 2\) but this run.s distributions have dimension 3"):
        PairCoupling(store, dim=3)
    with pytest.raises(DataError, match=r"shape \[2\] but this run's samples have shape \[1, 2\]"):
        PairCoupling(store, shape=(1, 2))


def test_pickled_store_reopens_its_maps(store_dir):
    import pickle

    store = PairStore(store_dir)
    store.get([0, 500])
    clone = pickle.loads(pickle.dumps(store))
    assert clone._maps == {} and torch.equal(clone.get([0, 500])[0], store.get([0, 500])[0])


@pytest.mark.slow
def test_sigkill_during_generation_then_resume(tmp_path):
    """A generating process killed with SIGKILL leaves recorded shards intact; resuming completes
    the store with exactly the pairs of an uninterrupted generation."""
    script = textwrap.dedent(
        """
        import sys, torch
        from rectflow.data import Gaussian
        from rectflow.models import MLPVelocity
        from rectflow.reflow.pairs import PairOptions, generate_pairs
        torch.manual_seed(0)
        model = MLPVelocity(2, width=64, depth=2)
        generate_pairs(model, Gaussian(2), sys.argv[1], 40_000, PairOptions(shard_size=2_000, solver="euler:60", device="cpu"), progress=False)
        """
    )

    def model():
        torch.manual_seed(0)
        from rectflow.models import MLPVelocity

        return MLPVelocity(2, width=64, depth=2)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cut")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    man = tmp_path / "cut" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(json.loads(man.read_text())["shards"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(json.loads(man.read_text())["shards"])
    assert 2 <= done < 20  # really killed mid-generation
    options = PairOptions(shard_size=2_000, solver="euler:60", device="cpu")
    resumed = generate_pairs(model(), Gaussian(2), tmp_path / "cut", 40_000, options, progress=False)
    ref = generate_pairs(model(), Gaussian(2), tmp_path / "ref", 40_000, options, progress=False)
    assert [e["sha256"] for e in resumed.manifest["shards"]] == [e["sha256"] for e in ref.manifest["shards"]]


def test_many_shards_through_memory_maps(tmp_path):
    store = make(tmp_path, n=150, shard_size=2)  # 75 shards: more than the maps kept open at once
    coupling = PairCoupling(store, in_memory=False)
    z0, z1 = coupling.sample(400, generator=gen(0))
    torch.testing.assert_close(z1, z0 + torch.tensor([1.0, -2.0]))
    assert len(store._maps) <= PairStore._MAX_OPEN_MAPS
    a0, _ = store.load()
    assert torch.equal(store.get(torch.arange(150))[0], a0)


class Nonlinear(nn.Module):
    """A velocity field that depends on x and t, so dopri5 needs several adaptive steps."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.5))
        self.dim = 2

    def forward(self, x, t):
        return torch.sin(self.w * x.flip(-1)) * (1 + t.reshape(-1, 1))


def test_shards_are_solved_in_bounded_batches_recorded_in_the_settings(tmp_path):
    # a shard of 300 solved 64 at a time: fixed-step results equal the whole-shard solve, and the
    # solve batch is part of the settings (dopri5 picks one step size per batch)
    whole = make(tmp_path, "whole", model=Nonlinear(), solver="rk4:8", solve_batch=300)
    parts = make(tmp_path, "parts", model=Nonlinear(), solver="rk4:8", solve_batch=64)
    torch.testing.assert_close(parts.load()[1], whole.load()[1])
    man = json.loads((parts.path / "manifest.json").read_text())
    assert man["settings"]["solve_batch"] == 64
    with pytest.raises(ConfigError, match="solve_batch"):
        make(tmp_path, "parts", model=Nonlinear(), solver="rk4:8", solve_batch=32)
    adaptive = make(tmp_path, "adaptive", model=Nonlinear(), solver="dopri5", rtol=1e-5, atol=1e-5, solve_batch=50)
    nfe = [e["nfe"] for e in json.loads((adaptive.path / "manifest.json").read_text())["shards"]]
    assert all(n > 6 for n in nfe)  # the mean NFE per pair over the shard's solves
    with pytest.raises(ConfigError, match="solve batch"):
        make(tmp_path, "bad", solve_batch=0)


def test_default_solve_batch_bounds_memory_and_keeps_low_dimensional_shards_whole(tmp_path):
    assert default_solve_batch((3, 32, 32)) == 1365 and default_solve_batch((2,)) == 2**21
    store = make(tmp_path)  # 2-D: one solve per shard, as before solve batches existed
    assert json.loads((store.path / "manifest.json").read_text())["settings"]["solve_batch"] == 300


def test_a_store_written_before_solve_batches_still_opens_and_resumes(tmp_path):
    store = make(tmp_path, n=600)
    path = store.path / "manifest.json"
    man = json.loads(path.read_text())
    del man["settings"]["solve_batch"]  # the older manifest layout: whole shards
    path.write_text(json.dumps(man))
    assert len(PairStore(store.path)) == 600
    assert len(make(tmp_path, n=600)) == 600  # same settings: reused, not refused


def test_default_options_solve_where_the_model_is_whatever_device_auto_would_pick(tmp_path, monkeypatch):
    """generate_pairs never moves the model: with device "auto" it solves on the model's device, not on the machine's
    preferred accelerator (a CPU model on a CUDA machine must not get CUDA inputs)."""
    from rectflow.engine import hardware

    monkeypatch.setattr(hardware, "default_device", lambda: torch.device("meta"))  # what auto would pick elsewhere
    store = generate_pairs(Shift(), Gaussian(2), tmp_path / "auto", 20, PairOptions(solver="euler:2"), progress=False)
    z0, z1 = store.load()
    torch.testing.assert_close(z1, z0 + torch.tensor([1.0, -2.0]))
    assert store.manifest["stats"]["device"] == "cpu"

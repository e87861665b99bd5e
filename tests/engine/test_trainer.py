
import os

import pytest
import torch

from rectflow.data import EightGaussians, Gaussian, Moons
from rectflow.engine import trainer as trainer_module
from rectflow.engine.io import read_jsonl
from rectflow.engine.trainer import EMA, TrainConfig, Trainer, lr_at, step_generator
from rectflow.errors import CheckpointError, ConfigError, DataError
from rectflow.flow.couplings import IndependentCoupling, MinibatchOTCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.models import MLPVelocity


def make(run_dir=None, steps=60, coupling="ind", width=32, **kw):
    torch.manual_seed(0)
    src, tgt = Gaussian(2), Moons()
    c = IndependentCoupling(src, tgt) if coupling == "ind" else MinibatchOTCoupling(src, tgt)
    cfg = TrainConfig(steps=steps, batch_size=64, lr=3e-3, warmup_steps=5, lr_schedule="cosine", log_every=10, ckpt_every=20, progress=False, **kw)
    return Trainer(MLPVelocity(2, width=width, depth=2), FlowMatchingObjective(c), cfg, run_dir, model_config={"width": width})


def weights(tr):
    sd = {f"m.{k}": v.clone() for k, v in tr.model.state_dict().items()}
    sd.update({f"e.{k}": v.clone() for k, v in tr.ema.model.state_dict().items()})
    return sd


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Crash(Exception):
    pass


def crash_at(step):
    def cb(trainer, s):
        if s == step:
            raise Crash

    return cb


def test_training_lowers_the_loss(tmp_path):
    make(tmp_path, steps=200).fit()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(10, 201, 10))
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_resume_after_crash_gives_identical_weights(tmp_path):
    ref = weights(make(tmp_path / "a").fit())
    crashed = make(tmp_path / "b")
    crashed.callbacks.append(crash_at(47))
    with pytest.raises(Crash):
        crashed.fit()
    assert sorted(p.name for p in crashed.checkpoints()) == ["step_00000020.safetensors", "step_00000040.safetensors"]
    resumed = make(tmp_path / "b")
    resumed.fit()
    assert_same(ref, weights(resumed))
    rows = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(10, 61, 10))  # no duplicated log rows
    a_rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in a_rows]


def test_ctrl_c_saves_the_current_step(tmp_path):
    tr = make(tmp_path / "c")

    def interrupt(trainer, s):
        if s == 33:
            raise KeyboardInterrupt

    tr.callbacks.append(interrupt)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert tr.checkpoints()[-1].name == "step_00000033.safetensors"
    resumed = make(tmp_path / "c").fit()
    assert_same(weights(make(tmp_path / "d").fit()), weights(resumed))


def test_worker_processes_draw_the_same_batches(tmp_path):
    a = weights(make(steps=15, coupling="ot", workers=0).fit())
    b = weights(make(steps=15, coupling="ot", workers=1).fit())
    assert_same(a, b)


def test_heavy_couplings_draw_in_process_on_cuda():
    # forked DataLoader workers cannot touch CUDA (images kept on the GPU): auto workers is 0 there
    tr = make(steps=2, coupling="ot")
    assert tr._num_workers() == (1 if (os.cpu_count() or 1) >= 2 else 0)
    tr.device = torch.device("cuda")  # only the choice is checked: nothing runs on the device
    assert tr._num_workers() == 0


class _BrokenCoupling(IndependentCoupling):
    """Draws fail the way bad data does: with a one-line DataError."""

    heavy = True

    def sample(self, n, *, generator=None, device=None):
        raise DataError("points.npy: row 3 is broken")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_error_in_a_batch_worker_surfaces_as_itself_in_one_line(tmp_path, workers):
    """issue 13 item 12: a DataLoader worker wrapped the error in its own 20-line traceback."""
    cfg = TrainConfig(steps=3, batch_size=8, progress=False, workers=workers, log_every=1, ckpt_every=3)
    tr = Trainer(MLPVelocity(2, width=8, depth=1), FlowMatchingObjective(_BrokenCoupling(Gaussian(2), Moons())), cfg, tmp_path)
    with pytest.raises(DataError) as e:
        tr.fit()
    assert str(e.value) == "points.npy: row 3 is broken"


def test_checkpoint_from_another_model_config_is_refused(tmp_path):
    make(tmp_path, steps=20).fit()
    with pytest.raises(CheckpointError, match="model config"):
        make(tmp_path, steps=40, width=16).fit()


def test_corrupt_checkpoint_is_reported(tmp_path):
    tr = make(tmp_path, steps=20).fit()
    ck = tr.checkpoints()[-1]
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        make(tmp_path, steps=40).fit()


def test_no_temporary_files_left(tmp_path):
    make(tmp_path, steps=40).fit()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_optimizer_state_round_trips(tmp_path):
    tr = make(tmp_path, steps=20).fit()
    tr2 = make(tmp_path, steps=20)
    assert tr2.resume() and tr2.step == 20
    s1, s2 = tr.optimizer.state_dict(), tr2.optimizer.state_dict()
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name])
    assert s1["param_groups"][0]["betas"] == s2["param_groups"][0]["betas"]


def test_step_generator_and_lr_schedule():
    assert torch.equal(torch.rand(3, generator=step_generator(1, 5)), torch.rand(3, generator=step_generator(1, 5)))
    assert not torch.equal(torch.rand(3, generator=step_generator(1, 5)), torch.rand(3, generator=step_generator(1, 6)))
    assert not torch.equal(torch.rand(3, generator=step_generator(1, 5)), torch.rand(3, generator=step_generator(2, 5)))
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine", lr_min=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, 100) == pytest.approx(0.1)


def test_ema_tracks_the_average():
    m = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(0.0)
        ema.model.weight.fill_(1.0)
    ema.update(step=10**6)  # warm-up factor saturated: decay 0.5
    assert float(ema.model.weight) == pytest.approx(0.5)


def test_bad_train_config():
    for kw, msg in [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"optimizer": "sgd"}, "optimizer"), ({"ema_decay": 1.0}, "ema_decay")]:
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(**kw).validate()


def test_divergence_is_reported(tmp_path):
    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x, t):
            return x * self.w * float("inf")

    cfg = TrainConfig(steps=5, batch_size=8, log_every=5, progress=False, ema_decay=0.0)
    obj = FlowMatchingObjective(IndependentCoupling(Gaussian(2), EightGaussians()))
    with pytest.raises(FloatingPointError, match="diverged"):
        Trainer(Exploding(), obj, cfg).fit()


def test_log_rows_and_bar_give_the_loss_per_coordinate_too(tmp_path, monkeypatch):
    """Issue 16 trap 7: ``loss`` is the per-sample sum of squares over the d coordinates (the paper's
    ||.||^2, twice the per-coordinate MSE in 2-D); ``loss_per_dim`` is the mean per coordinate."""
    postfixes = []

    class Bar:  # records what the progress bar would show
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n):
            pass

        def set_postfix(self, **kwargs):
            postfixes.append(kwargs)

        def close(self):
            pass

    monkeypatch.setattr(trainer_module, "tqdm", Bar)
    make(tmp_path, steps=20).fit()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows and all(r["loss_per_dim"] == pytest.approx(r["loss"] / 2) for r in rows)
    assert list(rows[0])[:4] == ["step", "steps", "loss", "loss_per_dim"]
    assert [float(p["loss_per_dim"]) for p in postfixes] == pytest.approx([r["loss_per_dim"] for r in rows], rel=1e-3)

"""Trainer speed knobs: power-function EMA, bf16 autocast, channels-last, torch.compile wiring."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rectflow.data import make_distribution
from rectflow.engine import trainer as trainer_module
from rectflow.engine.io import load_tensors
from rectflow.engine.trainer import EMA, TrainConfig, Trainer
from rectflow.errors import ConfigError
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.models import UNetVelocity


def image_trainer(run_dir=None, **kw):
    torch.manual_seed(0)
    src, tgt = make_distribution({"name": "gaussian", "shape": [1, 8, 8]}), make_distribution({"name": "digits"})
    model = UNetVelocity(1, 8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), head_channels=8, dropout=0.0)
    args = dict(steps=6, batch_size=16, lr=2e-3, log_every=3, ckpt_every=3, progress=False, seed=1, precision="fp32")  # exact comparisons
    args.update(kw)
    return Trainer(model, FlowMatchingObjective(IndependentCoupling(src, tgt)), TrainConfig(**args), run_dir, model_config={"k": 1})


def weights(tr):
    return {k: v.clone() for k, v in tr.model.state_dict().items()}


def test_power_ema_weights_grow_like_step_to_the_gamma():
    m = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(m, 0.0, kind="power", gamma=3.0)
    assert ema.decay_at(0) == 0.0  # the first update copies
    values = torch.arange(1.0, 201.0)  # parameter value after step j is j
    for k, v in enumerate(values):
        with torch.no_grad():
            m.weight.fill_(float(v))
        ema.update(k)
    w = values**3
    assert float(ema.model.weight) == pytest.approx(float((w * values).sum() / w.sum()), rel=2e-2)
    assert ema.decay_at(999) == pytest.approx((1 - 1 / 1000) ** 4)
    with pytest.raises(ConfigError):
        EMA(m, 0.9, kind="polynomial")


def test_power_ema_resumes_exactly(tmp_path):
    ref = image_trainer(tmp_path / "a", ema_kind="power").fit()

    class Crash(Exception):
        pass

    def crash(trainer, step):
        if step == 4:
            raise Crash

    tr = image_trainer(tmp_path / "b", ema_kind="power")
    tr.callbacks.append(crash)
    with pytest.raises(Crash):
        tr.fit()
    resumed = image_trainer(tmp_path / "b", ema_kind="power").fit()
    for k, v in ref.ema.model.state_dict().items():
        assert torch.equal(v, resumed.ema.model.state_dict()[k]), k


def test_bf16_and_channels_last_train_on_cpu():
    base = weights(image_trainer().fit())
    cl = image_trainer(channels_last=True).fit()
    for k, v in weights(cl).items():
        assert torch.allclose(v, base[k], atol=2e-4), k
    low = image_trainer(precision="bf16", steps=3).fit()
    assert all(torch.isfinite(v).all() for v in weights(low).values())
    assert all(p.dtype == torch.float32 for p in low.model.parameters())  # weights stay fp32


def test_compile_is_wired_and_checkpoints_keep_plain_keys(tmp_path, monkeypatch):
    calls = []
    real = torch.compile

    def eager_compile(model, **kw):
        calls.append(kw)
        return real(model, backend="eager", dynamic=kw.get("dynamic"))

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    tr = image_trainer(tmp_path, compile=True, steps=3).fit()
    assert len(calls) == 1
    assert calls[0].get("dynamic") is False  # a symbolic batch dimension (after one shape change) only costs speed

    tensors, _ = load_tensors(tr.checkpoints()[-1])
    assert not any("_orig_mod" in k for k in tensors)


def test_bad_speed_settings():
    for kw, msg in [({"precision": "fp16"}, "precision"), ({"ema_kind": "x"}, "ema_kind"), ({"ema_gamma": 0.0}, "ema_gamma"), ({"sample_every": -1}, "sample_every")]:
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(**kw).validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_trainer_with_every_knob(tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32
    tr = image_trainer(tmp_path, device="cuda", precision="bf16", channels_last=True, compile=True, ema_kind="power", steps=4).fit()
    assert tr.step == 4 and next(tr.model.parameters()).is_cuda
    assert torch.backends.cuda.matmul.allow_tf32 == before  # TF32 is switched on only while fit runs


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    from rectflow.engine.io import read_jsonl
    from rectflow.engine.trainer import TimeBudget

    tr = image_trainer(tmp_path, steps=1000, ckpt_every=1000, log_every=1000)
    budget = TimeBudget(1e-9, every=2)
    tr.callbacks.append(budget)
    tr.fit()
    assert tr.step == 2 and [p.name for p in tr.checkpoints()] == ["step_00000002.safetensors"]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [2]
    with pytest.raises(ConfigError):
        TimeBudget(0)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour of the GPU benchmarks")
def test_gpu_benchmarks_explain_themselves_without_cuda(tmp_path):
    root = Path(__file__).resolve().parents[2]
    for script in ("throughput.py", "cifar10.py"):
        r = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "needs a CUDA device" in r.stderr and "--cpu-smoke" in r.stderr
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "throughput.py"), "--cpu-smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "throughput_cpu_smoke.md").is_file()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour of the GPU check")
def test_the_gpu_check_runs_its_device_checks_in_smoke_mode_on_the_cpu(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr and "--smoke" in r.stderr
    checks = ["resume_layout", "syncs", "recompiles", "attention", "parity", "pair_batch", "dopri5"]
    r = subprocess.run([sys.executable, str(script), "--smoke", "--only", ",".join(checks), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(res[c]["ok"] for c in checks), {c: res[c] for c in checks if not res[c]["ok"]}
    assert res["recompiles"]["guided_3_calls"]["unique_graphs"] == 1  # the guided sampler compiles once, not per call
    assert res["attention"]["q_stride"][-1] == 1


@pytest.mark.parametrize("allowed", [True, False])
def test_the_tf32_setting_sets_both_cuda_flags_and_restores_them(allowed):
    # tf32: false must switch cuDNN's TF32 off as well (PyTorch's default lets cuDNN use it)
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    old = flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (not allowed, not allowed)
    try:
        with trainer_module._tf32(allowed):
            assert flags() == (allowed, allowed)
        assert flags() == (not allowed, not allowed)
        with trainer_module._tf32(None):  # the CPU: untouched
            assert flags() == (not allowed, not allowed)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

"""What survives Ctrl-C, divergence and corruption (issue 13, items 1-4): each test failed on the
code before the fix."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from rectflow.engine.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from rectflow.engine.io import read_jsonl
from rectflow.errors import CheckpointError
from tests.engine.test_trainer import assert_same, make, weights


def _adam_steps(path) -> set[float]:
    ck = read_checkpoint(path)
    return {float(v) for k, v in ck.tensors.items() if k.startswith("optim.") and k.endswith(".step")}


def test_ctrl_c_inside_the_optimizer_step_leaves_a_consistent_checkpoint(tmp_path):
    """SIGINT delivered after optimizer.step() but before the step counter moves: the checkpoint
    must hold the state after exactly the step it names, and the resumed run must equal an
    uninterrupted one."""
    ref = weights(make(tmp_path / "ref").fit())
    tr = make(tmp_path / "run")
    tr.optimizer.register_step_post_hook(lambda opt, args, kw: os.kill(os.getpid(), signal.SIGINT) if tr.step == 33 else None)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    ck = latest_checkpoint(tmp_path / "run")
    step = read_checkpoint(ck).step
    assert _adam_steps(ck) == {float(step)}, f"checkpoint of step {step} holds Adam steps {_adam_steps(ck)}"
    resumed = make(tmp_path / "run").fit()
    assert_same(weights(resumed), ref)


def test_divergence_never_writes_non_finite_weights_and_keeps_the_last_finite_checkpoint(tmp_path):
    make(tmp_path, steps=60).fit()  # 60 finite steps: checkpoints 40 and 60
    tr = make(tmp_path, steps=200, grad_clip=0.0)
    for g in tr.optimizer.param_groups:
        g["initial_lr"] = 1e6
    tr.cfg.lr = 1e6  # the same run, resumed with a learning rate that diverges
    with pytest.raises(FloatingPointError):
        tr.fit()
    ckpts = list_checkpoints(tmp_path)
    assert ckpts, "the last finite checkpoint was deleted"
    for p in ckpts:
        ck = read_checkpoint(p)
        assert all(bool(torch.isfinite(v).all()) for v in ck.tensors.values() if v.is_floating_point()), f"{p.name} holds non-finite weights"


def test_a_flipped_bit_inside_a_tensor_is_detected_on_load(tmp_path):
    make(tmp_path, steps=20).fit()
    path = latest_checkpoint(tmp_path)
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header + 100] ^= 0x10  # inside the tensor data, not the header
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=path.name):
        read_checkpoint(path)


def test_a_checkpoint_of_another_run_config_is_not_resumed(tmp_path):
    """A run directory without its config.json: the checkpoint's own record must be compared."""
    tr = make(tmp_path, steps=20)
    tr.run_record = {"target": "moons", "train": {"lr": 0.003}}
    tr.fit()
    other = make(tmp_path, steps=40)
    other.run_record = {"target": "circle", "train": {"lr": 0.01}}
    with pytest.raises(CheckpointError, match="target"):
        other.fit()


def test_a_run_directory_is_locked_against_a_second_writer_naming_its_pid(tmp_path):
    from rectflow.engine.io import exclusive_lock
    from rectflow.errors import BusyError

    with exclusive_lock(tmp_path / "run"):
        with pytest.raises(BusyError, match=f"pid {os.getpid()}"):
            with exclusive_lock(tmp_path / "run"):
                pass
    with exclusive_lock(tmp_path / "run"):  # released
        pass


def test_a_lock_held_by_a_killed_process_does_not_block(tmp_path):
    import subprocess
    import sys
    import time

    from rectflow.engine.io import exclusive_lock

    code = f"from rectflow.engine.io import exclusive_lock\nimport time\nwith exclusive_lock({str(tmp_path / 'run')!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    t = time.perf_counter()
    with exclusive_lock(tmp_path / "run"):
        assert time.perf_counter() - t < 5


def test_train_run_refuses_a_directory_in_use(tmp_path):
    from rectflow.engine.io import exclusive_lock
    from rectflow.errors import BusyError
    from rectflow.runs.config import config_from_dict
    from rectflow.runs.experiment import train_run

    cfg = config_from_dict({"target": "moons", "model": {"width": 16, "depth": 2}, "train": {"steps": 5, "batch_size": 16, "progress": False}})
    with exclusive_lock(tmp_path / "run"):
        with pytest.raises(BusyError, match="in use"):
            train_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()


def test_temporary_files_left_by_a_kill_mid_write_are_removed_on_the_next_start(tmp_path):
    from rectflow.runs.config import config_from_dict
    from rectflow.runs.experiment import train_run

    def cfg(steps):
        return config_from_dict({"target": "moons", "model": {"width": 16, "depth": 2}, "train": {"steps": steps, "batch_size": 16, "progress": False, "ckpt_every": 5}})

    train_run(cfg(5), tmp_path / "run")
    stale = [tmp_path / "run" / "checkpoints" / ".step_00000010.safetensors.k3j2h1.tmp", tmp_path / "run" / ".config.json.x8y7.tmp"]
    for f in stale:
        f.write_bytes(b"\0" * 4096)  # what a kill during a write leaves
    train_run(cfg(6), tmp_path / "run")  # the resumption
    assert not any(f.exists() for f in stale)


@pytest.mark.parametrize("garbage", [b"\xff\xfe\n", b"[1, 2]\n", b'{"step": "ten", "loss": 1.0}\n'])
def test_resuming_with_a_corrupt_training_log_names_the_file_and_keeps_it(tmp_path, garbage):
    """issue 13 item 11: a 0xff byte or a line that is not a row made the resumption fail with no
    file name (or a traceback); the log is not rewritten, so nothing in it is lost."""
    make(tmp_path, steps=20).fit()
    log = tmp_path / "metrics.jsonl"
    with open(log, "ab") as f:
        f.write(garbage)
    before = log.read_bytes()
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl: line 3") as e:
        make(tmp_path, steps=40).fit()
    assert "\n" not in str(e.value) and log.read_bytes() == before


def test_a_torn_last_log_line_is_still_repaired_silently(tmp_path):
    make(tmp_path, steps=20).fit()
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 21, "lo')  # a kill mid-append
    make(tmp_path, steps=40).fit()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30, 40]


def test_the_first_log_row_after_a_resume_says_how_many_steps_it_averages(tmp_path):
    """issue 13 item 14: resumed mid-window (checkpoint 33, rows every 10), the row at step 40
    averages steps 34-40 only; it must say so."""
    tr = make(tmp_path)

    def interrupt(trainer, s):
        if s == 33:
            raise KeyboardInterrupt

    tr.callbacks.append(interrupt)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    make(tmp_path).fit()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("steps")) for r in rows] == [(10, 10), (20, 10), (30, 10), (40, 7), (50, 10), (60, 10)]

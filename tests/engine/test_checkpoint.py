import pytest
import torch

from rectflow.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_optimizer_state,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)
from rectflow.engine.io import save_tensors
from rectflow.errors import CheckpointError
from rectflow.models import MLPVelocity
from tests.conftest import gen

MCFG = {"kind": "mlp", "width": 8, "depth": 2, "dim": 2}


def make_model(seed=0):
    torch.manual_seed(seed)
    return MLPVelocity(2, width=8, depth=2, time_dim=8)


def trained(steps=3):
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = gen(0)
    for _ in range(steps):
        x, t = torch.randn(16, 2, generator=g), torch.rand(16, generator=g)
        loss = model(x, t).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ema = make_model(1)  # weights distinct from the model's
    return model, ema, opt


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip_model_ema_optimizer(tmp_path):
    model, ema, opt = trained()
    path = save_checkpoint(checkpoint_path(tmp_path, 3), model=model, step=3, model_config=MCFG, ema_model=ema, optimizer=opt, train_config={"lr": 0.01})
    assert path == tmp_path / "checkpoints" / "step_00000003.safetensors" and path.is_file()
    ckpt = read_checkpoint(path, model_config=MCFG)
    assert ckpt.step == 3 and ckpt.model_config == MCFG and ckpt.has_ema
    assert ckpt.meta["format"] == CHECKPOINT_FORMAT and ckpt.meta["train_config"] == {"lr": 0.01}

    m2 = load_weights(make_model(5), ckpt, ema=False)
    assert_state_equal(m2.state_dict(), model.state_dict())
    e2 = load_weights(make_model(5), ckpt)  # EMA by default
    assert_state_equal(e2.state_dict(), ema.state_dict())

    fresh = make_model(5)
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    load_optimizer_state(opt2, ckpt)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) > 0
    for idx in s1["state"]:
        a, b = s1["state"][idx], s2["state"][idx]
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), (idx, k)
            else:
                assert a[k] == b[k], (idx, k)


def test_model_config_mismatch_refused(tmp_path):
    model, _, _ = trained(1)
    path = save_checkpoint(tmp_path / "c.safetensors", model=model, step=1, model_config=MCFG)
    with pytest.raises(CheckpointError, match="model config"):
        read_checkpoint(path, model_config={**MCFG, "width": 16})
    read_checkpoint(path)  # no config given: no comparison


def test_weights_prefers_ema_only_when_present_and_asked(tmp_path):
    model, ema, _ = trained(1)
    with_ema = read_checkpoint(save_checkpoint(tmp_path / "a.safetensors", model=model, step=1, model_config=MCFG, ema_model=ema))
    assert_state_equal(with_ema.weights(), ema.state_dict())
    assert_state_equal(with_ema.weights(ema=False), model.state_dict())
    no_ema = read_checkpoint(save_checkpoint(tmp_path / "b.safetensors", model=model, step=1, model_config=MCFG))
    assert not no_ema.has_ema
    assert_state_equal(no_ema.weights(ema=True), model.state_dict())


def test_load_weights_wrong_shape_and_missing_optimizer(tmp_path):
    model, _, _ = trained(1)
    ckpt = read_checkpoint(save_checkpoint(tmp_path / "a.safetensors", model=model, step=1, model_config=MCFG))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(MLPVelocity(2, width=4, depth=2, time_dim=8), ckpt)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_optimizer_state(torch.optim.Adam(model.parameters()), ckpt)


def test_list_and_latest_checkpoints(tmp_path):
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="no checkpoints"):
        latest_checkpoint(tmp_path)
    model = make_model()
    for step in (100, 5, 20):
        save_checkpoint(checkpoint_path(tmp_path, step), model=model, step=step, model_config=MCFG)
    (tmp_path / "checkpoints" / ".step_00000200.safetensors.abc.tmp").write_bytes(b"partial")
    (tmp_path / "checkpoints" / "notes.txt").write_text("x")
    found = list_checkpoints(tmp_path)
    assert [read_checkpoint(p).step for p in found] == [5, 20, 100]
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 100)


@pytest.mark.parametrize("meta", [{"format": "someone-else/1", "step": 1}, {"step": 1}])
def test_foreign_format_refused(tmp_path, meta):
    p = tmp_path / "foreign.safetensors"
    save_tensors(p, {"model.w": torch.zeros(2)}, meta)
    with pytest.raises(CheckpointError, match="not a rectflow checkpoint"):
        read_checkpoint(p)


def test_optimizer_state_comes_back_in_each_parameters_layout(tmp_path):
    # fused AdamW (CUDA) needs params, grads and moments of one layout: a channels-last conv weight's
    # moments must come back channels-last although the file stores contiguous tensors
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1)).to(memory_format=torch.channels_last)

    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", model=model, step=1, model_config={}, optimizer=opt)
    model2 = make()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    load_optimizer_state(opt2, read_checkpoint(tmp_path / "c.safetensors"))
    for p, p_old in zip(model2.parameters(), model.parameters()):
        for name in ("exp_avg", "exp_avg_sq"):
            v = opt2.state[p][name]
            assert v.stride() == p.stride(), (name, tuple(p.shape))
            assert torch.equal(v, opt.state[p_old][name])
    assert model2[0].weight.stride() != torch.empty(model2[0].weight.shape).stride()  # the layouts really differ


def _flip_header_bit(path, byte_offset, bit):
    data = bytearray(path.read_bytes())
    data[8 + byte_offset] ^= 1 << bit  # 8 bytes of header length, then the JSON header
    path.write_bytes(bytes(data))


def test_a_bit_flip_anywhere_in_the_metadata_is_refused(tmp_path):
    """issue 31 item 4: the header (step, configs, run record) was not covered by the checksum: '"step":"100"' -> 110 was accepted."""
    import json
    import struct

    model, ema, opt = trained(3)
    path = save_checkpoint(checkpoint_path(tmp_path, 3), model=model, step=3, model_config=MCFG, ema_model=ema, optimizer=opt,
                           train_config={"lr": 0.01, "steps": 10}, run_record={"a": 1})
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + n])
    meta_text = json.dumps(header["__metadata__"])
    start = path.read_bytes()[8:8 + n].find(b'"__metadata__"')
    accepted = 0
    for k in range(len(meta_text) - 2):  # every byte (safetensors orders the metadata keys at random: no sample of offsets is safe)
        for bit in ((0, 3) if k % 7 == 0 else (0,)):
            trial = tmp_path / f"t_{k}_{bit}" / "checkpoints" / "step_00000003.safetensors"
            trial.parent.mkdir(parents=True)
            trial.write_bytes(path.read_bytes())
            _flip_header_bit(trial, start + k, bit)
            try:
                read_checkpoint(trial, model_config=MCFG)
                accepted += 1
            except CheckpointError:
                pass
    assert accepted == 0


def test_the_step_must_agree_with_the_file_name_and_the_optimizer(tmp_path):
    model, ema, opt = trained(3)
    good = save_checkpoint(checkpoint_path(tmp_path, 3), model=model, step=3, model_config=MCFG, optimizer=opt)
    assert read_checkpoint(good).step == 3
    renamed = checkpoint_path(tmp_path, 5)
    renamed.write_bytes(good.read_bytes())
    with pytest.raises(CheckpointError, match="step 3 .*step_00000005"):
        read_checkpoint(renamed)
    wrong = save_checkpoint(checkpoint_path(tmp_path / "w", 7), model=model, step=7, model_config=MCFG, optimizer=opt)
    with pytest.raises(CheckpointError, match="optimizer"):
        load_optimizer_state(torch.optim.Adam(make_model().parameters(), lr=1e-2), read_checkpoint(wrong))


def test_a_parameter_without_a_gradient_on_some_steps_still_resumes(tmp_path):
    """Adam counts a parameter's steps only when it had a gradient: the step check reads the most-trained parameter."""
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = gen(0)
    first = next(model.parameters())
    for k in range(4):
        x, t = torch.randn(8, 2, generator=g), torch.rand(8, generator=g)
        loss = model(x, t).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if k % 2:
            first.grad = None  # this parameter sits out every other step
        opt.step()
    path = save_checkpoint(checkpoint_path(tmp_path, 4), model=model, step=4, model_config=MCFG, optimizer=opt)
    load_optimizer_state(torch.optim.Adam(make_model().parameters(), lr=1e-2), read_checkpoint(path))

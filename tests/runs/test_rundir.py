import pytest

from rectflow.engine.checkpoint import diff_keys
from rectflow.engine.io import save_json
from rectflow.errors import ConfigError
from rectflow.runs.config import config_from_dict, config_to_dict
from rectflow.runs.rundir import RESUMABLE_TRAIN_KEYS, guard_run_dir, semantic_config


def cfg_dict(**train):
    return config_to_dict(config_from_dict({"train": {"steps": 10, **train}}))


def test_semantic_config_drops_eval_and_resumable_train_keys():
    d = cfg_dict()
    s = semantic_config(d)
    assert "eval" not in s
    assert not RESUMABLE_TRAIN_KEYS & set(s["train"])
    assert {"lr", "seed", "batch_size", "ema_decay"} <= set(s["train"])  # result-defining keys stay
    assert {k: v for k, v in s.items() if k != "train"} == {k: v for k, v in d.items() if k not in ("train", "eval")}


def test_semantic_config_equal_iff_only_resumable_keys_change():
    base = semantic_config(cfg_dict())
    same = cfg_dict(steps=99, log_every=3, ckpt_every=5, progress=False, device="cpu", keep_checkpoints=7)
    same["eval"]["n_samples"] = 17
    assert semantic_config(same) == base
    assert semantic_config(cfg_dict(lr=0.5)) != base


def test_diff_keys_nested():
    a = {"x": 1, "m": {"w": 16, "d": 2, "deep": {"k": [1, 2]}}, "only_a": 0}
    b = {"x": 1, "m": {"w": 32, "d": 2, "deep": {"k": [1, 3]}}, "only_b": {"z": 1}}
    assert diff_keys(a, b) == ["m.deep.k", "m.w", "only_a", "only_b"]
    assert diff_keys(a, a) == []
    assert diff_keys({"m": {"w": 1}}, {"m": 5}) == ["m"]  # a section replaced by a value


def test_diff_keys_none_vs_missing_key():
    assert diff_keys({"coupling": {"pairs": None}}, {"coupling": {}}) == ["coupling.pairs"]


def test_guard_missing_record(tmp_path):
    rec = cfg_dict()
    assert guard_run_dir(tmp_path / "new", "config.json", rec) is False
    assert guard_run_dir(tmp_path, "config.json", rec, foreign_ok=False) is False  # empty dir is fine
    assert not (tmp_path / "new").exists()  # the guard writes nothing


def test_guard_same_record_resumes(tmp_path):
    save_json(tmp_path / "config.json", cfg_dict())
    assert guard_run_dir(tmp_path, "config.json", cfg_dict()) is True
    # only the step budget changed: the same job under semantic_config
    assert guard_run_dir(tmp_path, "config.json", cfg_dict(steps=50), normalise=semantic_config) is True
    with pytest.raises(ConfigError, match="train.steps"):
        guard_run_dir(tmp_path, "config.json", cfg_dict(steps=50))  # without normalising, steps count


def test_guard_different_record_lists_keys(tmp_path):
    save_json(tmp_path / "config.json", cfg_dict())
    other = cfg_dict(lr=0.5, seed=3)
    other["model"]["width"] = 8
    with pytest.raises(ConfigError) as e:
        guard_run_dir(tmp_path, "config.json", other, what="stage", normalise=semantic_config)
    msg = str(e.value)
    assert str(tmp_path) in msg and "stage" in msg
    assert "model.width, train.lr, train.seed" in msg
    assert "train.steps" not in msg


def test_guard_says_what_the_directory_holds_so_the_user_can_resume_it(tmp_path):
    # a job made with an older default (say 12 solver steps, now 24) is resumed by passing the old value
    save_json(tmp_path / "config.json", {"settings": {"solver_steps": 12, "windows": 4}})
    with pytest.raises(ConfigError) as e:
        guard_run_dir(tmp_path, "config.json", {"settings": {"solver_steps": 24, "windows": 4, "new_key": 1}}, what="perflow job")
    msg = str(e.value)
    assert "differs in settings.new_key, settings.solver_steps" in msg
    assert "there: settings.new_key missing, settings.solver_steps=12" in msg
    assert "\n" not in msg


def test_guard_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("someone else's")
    rec = cfg_dict()
    assert guard_run_dir(tmp_path, "config.json", rec) is False  # foreign_ok=True by default
    with pytest.raises(ConfigError, match="not a run directory"):
        guard_run_dir(tmp_path, "config.json", rec, foreign_ok=False)
    save_json(tmp_path / "config.json", rec)
    assert guard_run_dir(tmp_path, "config.json", rec, foreign_ok=False) is True  # now it is a run

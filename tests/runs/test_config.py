import pytest

from rectflow.errors import ConfigError
from rectflow.runs.config import apply_overrides, config_from_dict, config_to_dict, load_config


def test_defaults_round_trip():
    cfg = config_from_dict({})
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("target: 8gaussians\ntrain:\n  steps: 10\n  lr: 0.01\ncoupling: {kind: ot}\n")
    cfg = load_config(p, ["train.steps=20", "train.lr=1e-4", "source={name: 8gaussians, radius: 2}", "time.kind=u_shaped"])
    assert cfg.train.steps == 20 and cfg.train.lr == 1e-4 and cfg.coupling.kind == "ot"
    assert cfg.source == {"name": "8gaussians", "radius": 2} and cfg.time.kind == "u_shaped"


@pytest.mark.parametrize(
    "data, msg",
    [
        ({"trian": {}}, "unknown config key 'trian'"),
        ({"train": {"stpes": 3}}, "unknown config key 'train.stpes'; did you mean 'train.steps'"),
        ({"train": {"xyzzy": 3}}, "unknown config key 'train.xyzzy'.*allowed keys"),
        ({"train": {"steps": "many"}}, "train.steps.*integer"),
        ({"train": {"lr": True}}, "train.lr.*number"),
        ({"coupling": {"kind": "greedy"}}, "coupling.kind.*not one of"),
        ({"time": {"kind": "beta"}}, "time.kind"),
        ({"eval": {"solvers": ["euler:0"]}}, "must be >= 1"),
        ({"eval": {"solvers": ["rk45"]}}, "unknown sampler"),
        ({"eval": {"rtol": 0.0}}, "rtol"),
        ({"eval": {"holdout": 1.0}}, "eval.holdout"),
        ({"eval": {"holdout": -0.1}}, "eval.holdout"),
        ({"train": 5}, "must be a mapping"),
    ],
)
def test_invalid_configs_name_the_key(data, msg):
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(data)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="key.subkey=value"):
        apply_overrides({}, ["train.steps"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr_min=-0.01", "lr_min"),
        ("train.lr=inf", "lr"),
        ("train.lr_min=0.5", "lr_min"),  # above lr
        ("source={name: gaussian, std: .nan}", "source.std"),
        ("target={name: moons, noise: .nan}", "target.noise"),
        ("train.weight_decay=-1", "weight_decay"),
    ],
)
def test_numbers_that_make_no_sense_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


@pytest.mark.parametrize("reg", ["0", "-0.1"])
def test_sinkhorn_needs_a_positive_regulariser_named_at_config_time(reg):
    """issue 13 item 12: coupling.reg=0 used to fail inside a DataLoader worker, 20 lines long."""
    with pytest.raises(ConfigError, match="coupling.reg"):
        load_config(None, ["coupling.kind=ot", "coupling.method=sinkhorn", f"coupling.reg={reg}"])


def test_a_mistyped_key_suggests_the_close_one_in_a_short_line():
    with pytest.raises(ConfigError, match="did you mean 'train.steps'") as e:
        load_config(None, ["train.stpes=3"])
    assert len(str(e.value)) < 120


def test_a_key_written_twice_in_yaml_is_refused_with_both_lines(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {lr: 0.05, steps: 7}\ntarget: moons\ntrain: {batch_size: 16}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'train' appears twice .*lines 1 and 3"):
        load_config(p)

"""k-rectified flow (theory §4): reflow straightens paths and never raises the transport
cost; 1-D reflow gives a monotone coupling; reflow runs are ordinary runs with their lineage
in the config; bad inputs are refused before anything is written."""

import json

import pytest
import torch
from scipy.stats import kendalltau

from rectflow.data import Gaussian, PointCloud
from rectflow.engine.checkpoint import load_weights, read_checkpoint
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.errors import CheckpointError, ConfigError, DataError
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.flow.metrics import wasserstein2
from rectflow.models import MLPVelocity
from rectflow.reflow.distill import one_step
from rectflow.reflow.pairs import PairCoupling, PairOptions, generate_pairs
from rectflow.runs.config import config_from_dict, config_to_dict
from rectflow.runs.diagnose import diagnose_runs, format_stage_table
from rectflow.runs.distill_job import train_distill
from rectflow.runs.evaluation import evaluate_run
from rectflow.runs.experiment import build_model, load_run, model_config, train_run
from rectflow.runs.lineage import default_pairs_dir, stage_label
from rectflow.runs.reflow_job import default_reflow_dir, train_reflow
from tests.conftest import gen
from tests.runs.test_experiment import Net, Ring, tiny

TINY = {
    "target": "moons",
    "model": {"width": 64, "depth": 2},
    "train": {"steps": 1000, "batch_size": 256, "lr": 2e-3, "warmup_steps": 50, "ckpt_every": 500, "log_every": 100, "progress": False, "device": "cpu"},
    "eval": {"n_samples": 600, "solvers": ["euler:1", "euler:4", "euler:50"]},
}
PAIRS = {"n_pairs": 4000, "options": PairOptions(solver="euler:50", shard_size=1500, device="cpu"), "progress": False}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A small 1-RF on N -> moons and its 2-RF (initialised from the 1-RF)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reflow")
    train_run(config_from_dict(TINY), root / "moons")
    two = train_reflow(root / "moons", n_pairs=PAIRS["n_pairs"], steps=600, **{k: v for k, v in PAIRS.items() if k != "n_pairs"})
    return root / "moons", two


def test_reflow_run_is_a_run_with_its_lineage(chain):
    one, two = chain
    assert two == default_reflow_dir(one, 2) == one.parent / "moons-2rf"
    cfg = json.loads((two / "config.json").read_text())
    store = default_pairs_dir(one, 4000, "euler:50", 0)
    assert cfg["coupling"] == {"kind": "pairs", "method": "exact", "reg": 0.05, "pairs": str(store.resolve())}
    assert cfg["reflow"]["stage"] == 2 and cfg["reflow"]["parent"] == str(one.resolve())
    assert cfg["reflow"]["init"] == str((one / "checkpoints" / "step_00001000.safetensors").resolve())
    assert cfg["train"]["steps"] == 600 and cfg["source"] == "gaussian" and cfg["target"] == "moons"
    run = load_run(two)
    assert stage_label(run.config) == "2-RF" and run.step == 600
    assert [r["solver"] for r in evaluate_run(run, n=200, write=False)] == ["euler:1", "euler:4", "euler:50"]
    man = json.loads((store / "manifest.json").read_text())
    assert man["provenance"]["stage"] == 1 and man["settings"]["source"] == "gaussian"
    # the same command again is a no-op (same pairs, same run)
    before = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert train_reflow(one, n_pairs=4000, steps=600, **{k: v for k, v in PAIRS.items() if k != "n_pairs"}) == two
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == before


def test_reflow_straightens_and_never_raises_the_transport_cost(chain):
    """theory §4: each reflow lowers convex transport costs and straightness; crossings fall."""
    rows = diagnose_runs(list(chain), n=800, solvers=["euler:1", "euler:50"], coupling_solver="euler:50", n_pairs=4000)
    ind, r1, r2 = rows
    assert [r["stage"] for r in rows] == ["independent", "1-RF", "2-RF"]
    assert r2["transport_cost"] <= r1["transport_cost"] * 1.01 < ind["transport_cost"]
    assert r2["transport_excess"] <= r1["transport_excess"] + 1e-6 < ind["transport_excess"]  # (1-RF is often OT on a sample already)
    assert r2["straightness"] < r1["straightness"] / 5
    assert r2["crossing"] <= r1["crossing"] < ind["crossing"]
    assert r2["w2@euler:1"] < r1["w2@euler:1"] / 2  # one step works after reflow
    assert "| 2-RF |" in format_stage_table(rows, ["euler:1", "euler:50"])


def test_init_from_previous_copies_the_ema_weights(chain):
    one, _ = chain
    parent = load_run(one)
    mcfg = model_config(parent.config, 2)
    model = build_model(mcfg)
    load_weights(model, read_checkpoint(parent.checkpoint, model_config=mcfg))
    for a, b in zip(model.state_dict().values(), parent.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="does not match"):
        read_checkpoint(parent.checkpoint, model_config={**mcfg, "width": 32})


def test_distillation_runs_and_their_refusals(chain, tmp_path):
    one, two = chain
    d = train_distill(two, tmp_path / "d", n_pairs=4000, steps=50, overrides=["train.lr=0.0001"], **{k: v for k, v in PAIRS.items() if k != "n_pairs"})
    run = load_run(d)
    assert stage_label(run.config) == "2-RF+distill" and run.config.eval.solvers == ["euler:1"]
    assert run.config.coupling.pairs == str(default_pairs_dir(two, 4000, "euler:50", 0).resolve())
    rnd = train_distill(one, tmp_path / "r", coupling="independent", init="scratch", steps=20, progress=False, options=PairOptions(device="cpu"))
    cfg = load_run(rnd).config
    assert stage_label(cfg) == "distill (independent)" and cfg.reflow.init is None and cfg.coupling.kind == "independent"
    with pytest.raises(ConfigError, match="distillation run"):
        train_reflow(d, tmp_path / "x", n_pairs=100, progress=False)
    with pytest.raises(ConfigError, match="already a distillation run"):
        train_distill(d, tmp_path / "y", n_pairs=100, progress=False)
    with pytest.raises(ConfigError, match="number of pairs"):
        train_distill(two, tmp_path / "z", progress=False)
    with pytest.raises(ConfigError, match="init must be"):
        train_reflow(one, tmp_path / "w", n_pairs=4000, init="latest", **{k: v for k, v in PAIRS.items() if k != "n_pairs"})
    assert not any((tmp_path / n).exists() for n in "xyzw")


def test_pairs_of_another_dimension_are_refused(chain, tmp_path):
    class Shift3(torch.nn.Module):
        dim = 3

        def forward(self, x, t):
            return torch.ones_like(x)

    store = generate_pairs(Shift3(), Gaussian(3), tmp_path / "p3", 50, PairOptions(solver="euler:1", device="cpu"), progress=False)
    d = config_to_dict(load_run(chain[0]).config)
    d.update(coupling={"kind": "pairs", "pairs": str(store.path)}, reflow={"stage": 2})
    with pytest.raises(DataError, match=r"pairs have shape \[3\] but this run's samples have shape \[2\]"):
        train_run(config_from_dict(d), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize(
    "patch, msg",
    [
        ({"coupling": {"kind": "pairs"}, "reflow": {"stage": 2}}, "set the pair-store directory"),
        ({"coupling": {"kind": "independent", "pairs": "p"}}, "only used with coupling.kind=pairs"),
        ({"coupling": {"kind": "pairs", "pairs": "p"}}, "is a \\(k\\+1\\)-RF"),
        ({"reflow": {"stage": 3}}, "is a \\(k\\+1\\)-RF"),
        ({"reflow": {"stage": 0}}, "must be >= 1 for a flow"),
        ({"reflow": {"distill_loss": "lpips"}}, "reflow.distill_loss"),
        ({"reflow": {"huber_c": -1.0}}, "huber_c"),
        ({"reflow": {"stgae": 2}}, "unknown config key 'reflow.stgae'"),
    ],
)
def test_reflow_config_is_strict(patch, msg):
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(patch)


def test_missing_pair_store_is_a_clear_error(tmp_path):
    cfg = config_from_dict({**TINY, "coupling": {"kind": "pairs", "pairs": str(tmp_path / "none")}, "reflow": {"stage": 2}})
    with pytest.raises(CheckpointError, match="not a pair store"):
        train_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_one_dimensional_reflow_gives_a_monotone_coupling():
    """In 1-D the optimal (and any straight, non-crossing) coupling is the monotone one: the
    1-RF's pairs are ordered, and after one reflow a single Euler step preserves the order."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    bimodal = torch.cat([0.3 * torch.randn(3000, 1, generator=g) - 2, 0.3 * torch.randn(3000, 1, generator=g) + 2])
    source, target = Gaussian(1), PointCloud(bimodal)
    cfg = TrainConfig(steps=1500, batch_size=256, lr=2e-3, ema_decay=0.99, lr_schedule="cosine", progress=False, device="cpu")
    one = MLPVelocity(1, width=64, depth=2, time_dim=16)
    one = Trainer(one, FlowMatchingObjective(IndependentCoupling(source, target)), cfg).fit().eval_model
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store = generate_pairs(one, source, tmp + "/pairs", 4000, PairOptions(solver="euler:50", device="cpu"), progress=False)
        z0, z1 = store.load()
        assert kendalltau(z0.squeeze(1), z1.squeeze(1)).statistic > 0.999  # the 1-RF coupling is monotone
        two = MLPVelocity(1, width=64, depth=2, time_dim=16)
        two.load_state_dict(one.state_dict())
        two = Trainer(two, FlowMatchingObjective(PairCoupling(store)), TrainConfig(**{**cfg.__dict__, "steps": 800})).fit().eval_model
    x0 = torch.randn(2000, 1, generator=gen(5))
    x_two, x_one = one_step(two, x0), one_step(one, x0)
    tau_two = kendalltau(x0.squeeze(1), x_two.squeeze(1)).statistic
    assert tau_two > 0.95, tau_two  # nearly monotone after one reflow (the 1-RF one-step map: tau ~ 0)
    assert kendalltau(x0.squeeze(1), x_one.squeeze(1)).statistic < tau_two
    ref = target.sample(2000, generator=gen(6))
    assert wasserstein2(x_two, ref) < 0.5 * wasserstein2(x_one, ref)  # and one step now lands on pi1


def test_reflow_and_distill_take_the_users_objects(tmp_path):
    """Issue 16 trap 5: a run of a user's distribution and network reflows and distils from Python;
    the child gets the same objects (a fresh network: a copy of the parent's, or from ``model``)."""
    train_run(tiny(train__steps=10, train__ckpt_every=10), tmp_path / "ring", target=Ring(), model=Net())
    quick = {"n_pairs": 64, "options": PairOptions(solver="euler:4", device="cpu"), "progress": False, "steps": 5}
    two = train_reflow(tmp_path / "ring", tmp_path / "ring-2rf", target=Ring(), model=Net, **quick)
    run = load_run(two, target=Ring(), model=Net)
    assert stage_label(run.config) == "2-RF" and isinstance(run.model, Net) and run.step == 5
    d = train_distill(run, tmp_path / "ring-2rf-distill", **quick)  # a loaded run carries its objects
    assert load_run(d, target=Ring(), model=Net).config.reflow.distill
    with pytest.raises(ConfigError, match="scratch.*model="):
        train_distill(run, tmp_path / "scratch", init="scratch", **quick)
    assert evaluate_run(load_run(d, target=Ring(), model=Net), n=40, write=False)[0]["nfe"] == 1

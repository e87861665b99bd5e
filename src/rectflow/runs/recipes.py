"""Named recipes: the settings the benchmarks measured best, for the whole chain (teacher, reflow,
distillation), so a user types ``--recipe 2d`` instead of a dozen flags.

A recipe fills what the user did not say: its config values come before the user's overrides, and
its step counts and distillation loss apply only when ``--steps`` / ``--loss`` / ``--huber-c`` are
not given.  The library's own defaults stay generic because they also serve image networks (for
which the 2-D learning rate is far too high; the image configs in ``configs/`` carry their own).

``2d``: the 3x256 MLP on 2-D data (``benchmarks/results/recipe.md``, ``moons_study.md``):
Adam at lr 5e-3 with a 200-step warmup and cosine decay to 0, EMA 0.999, batch 256, grad clip
1.0, uniform t and minibatch OT (exact) for a 10k-step teacher; a reflow trains 5k steps on 20k
dopri5 pairs; distillation trains 80k steps with the pseudo-Huber loss at c = 0.05.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rectflow.errors import ConfigError

__all__ = ["Recipe", "RECIPES", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    """One measured recipe.  ``train`` / ``time`` / ``coupling``: config sections of the teacher
    (a 1-RF); a reflow or distillation run inherits the teacher's training settings and takes
    ``reflow_steps`` / ``distill_steps`` steps on ``n_pairs`` pairs."""

    name: str
    summary: str
    evidence: str
    train: dict[str, Any] = field(default_factory=dict)
    time: dict[str, Any] = field(default_factory=dict)
    coupling: dict[str, Any] = field(default_factory=dict)
    teacher_steps: int = 5000
    reflow_steps: int = 5000
    n_pairs: int = 20_000
    distill_steps: int = 5000
    distill_loss: str = "l2"
    huber_c: float = 0.0

    def teacher_sections(self) -> dict[str, dict[str, Any]]:
        """The teacher's config sections, under which a user's config file and overrides go."""
        return {"train": {**self.train, "steps": self.teacher_steps}, "time": dict(self.time), "coupling": dict(self.coupling)}


RECIPES: dict[str, Recipe] = {
    "2d": Recipe(
        name="2d",
        summary="the 3x256 MLP on 2-D data: lr 5e-3 cosine (warmup 200), OT teacher 10k steps, reflow 5k, distillation 80k pseudo-Huber c 0.05",
        evidence="benchmarks/results/recipe.md, benchmarks/results/moons_study.md",
        train={"lr": 0.005, "lr_schedule": "cosine", "warmup_steps": 200, "lr_min": 0.0, "ema_decay": 0.999, "batch_size": 256, "grad_clip": 1.0,
               "precision": "fp32"},  # measured in fp32 (recipe.md); a 2-D MLP gains little from bf16
        time={"kind": "uniform"},
        coupling={"kind": "ot", "method": "exact"},
        teacher_steps=10_000,
        reflow_steps=5000,
        n_pairs=20_000,
        distill_steps=80_000,
        distill_loss="pseudo_huber",
        huber_c=0.05,
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ConfigError naming the known ones otherwise."""
    if name not in RECIPES:
        raise ConfigError(f"--recipe: unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]

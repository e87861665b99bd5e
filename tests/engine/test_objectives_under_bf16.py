"""Every objective of the library trains a convolutional network under bf16 autocast on the CPU.

``precision: auto`` is bf16 wherever the CPU has native bf16, so an objective that cannot run under autocast breaks
training on those machines only (MeanFlow's forward-mode derivative did: autocast casts a convolution's weights, not its
dual inputs).  Two steps of a tiny UNet per objective; the weights must stay finite and move."""

import pytest
import torch

from rectflow.data.image_sets import make_image_distribution
from rectflow.diffusion.schedules import DDPMSchedule
from rectflow.diffusion.weighting import DiffusionObjective
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.flow.meanflow import MeanFlowObjective, ShortcutObjective
from rectflow.images.conditional import ConditionalFlowMatchingObjective, LabelledCoupling
from rectflow.models.unet import UNetAverageVelocity, UNetVelocity
from rectflow.perflow.objective import PeRFlowObjective
from rectflow.perflow.teacher import Teacher
from rectflow.perflow.windows import make_windows
from rectflow.reflow.distill import DistillationObjective

UNET = dict(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), head_channels=8, dropout=0.0)


def _source():
    return make_image_distribution({"name": "gaussian", "shape": [1, 8, 8]})


def _digits():
    return make_image_distribution({"name": "digits"})


class _Images:
    """Unlabelled 8x8 data for PeRFlow (``sample(n) -> images``)."""

    def __init__(self):
        self.digits = _digits()

    def sample(self, n, *, generator=None, device=None):
        x = self.digits.sample(n, generator=generator, device=device)
        return x[0] if isinstance(x, tuple) else x


def _perflow():
    teacher = Teacher(UNetVelocity(**UNET).requires_grad_(False), DDPMSchedule(), "eps")
    return PeRFlowObjective(teacher, _Images(), make_windows(2), solver_steps=2), UNetVelocity(**UNET)


CASES = {
    "flow matching": lambda: (FlowMatchingObjective(IndependentCoupling(_source(), _digits())), UNetVelocity(**UNET)),
    "diffusion eps": lambda: (DiffusionObjective(IndependentCoupling(_source(), _digits()), DDPMSchedule(), "eps"), UNetVelocity(**UNET)),
    "class-conditional": lambda: (ConditionalFlowMatchingObjective(LabelledCoupling(_source(), _digits()), p_uncond=0.2),
                                  UNetVelocity(**UNET, num_classes=10)),
    "distillation": lambda: (DistillationObjective(IndependentCoupling(_source(), _digits())), UNetVelocity(**UNET)),
    "meanflow": lambda: (MeanFlowObjective(IndependentCoupling(_source(), _digits())), UNetAverageVelocity(**UNET)),
    "shortcut": lambda: (ShortcutObjective(IndependentCoupling(_source(), _digits())), UNetAverageVelocity(**UNET)),
    "perflow": _perflow,
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_objective_trains_a_unet_under_bf16_autocast(name):
    torch.manual_seed(0)
    objective, net = CASES[name]()
    before = [p.detach().clone() for p in net.parameters()]
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3, ema_decay=0.0, progress=False, precision="bf16", log_every=1, ckpt_every=10**6,
                      device="cpu", workers=0)
    Trainer(net, objective, cfg).fit()
    after = list(net.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))

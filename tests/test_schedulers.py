"""Every torch.optim.lr_scheduler drives fused_optim exactly as it drives torch.optim."""

import pytest
import torch

import fused_optim
from parity import run_parity

S = torch.optim.lr_scheduler


class _Plateau:
    """ReduceLROnPlateau fed a loss that stops improving, so it reduces the lr."""

    def __init__(self, opt):
        self.sched = S.ReduceLROnPlateau(opt, patience=1, factor=0.5)

    def step(self):
        self.sched.step(1.0)


SCHEDULERS = {
    "LambdaLR": lambda o: S.LambdaLR(o, lambda e: 0.9**e),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda e: 0.95),
    "StepLR": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.2, total_iters=6),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.8),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=8, power=2.0),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=7),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=3), S.ExponentialLR(o, gamma=0.9)], milestones=[3]
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ExponentialLR(o, gamma=0.9), S.StepLR(o, 2, 0.5)]),
    "ReduceLROnPlateau": _Plateau,
    "CyclicLR cycling betas": lambda o: S.CyclicLR(
        o, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95
    ),
    "OneCycleLR cycling betas": lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=12),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_parity(name, device):
    opt, _, _, _ = run_parity(
        fused_optim.AdamW,
        torch.optim.AdamW,
        {"lr": 0.05, "amsgrad": True},
        device=device,
        steps=10,
        scheduler=SCHEDULERS[name],
    )
    if "betas" in name:
        assert opt.param_groups[0]["betas"][0] != 0.9


def test_scheduler_with_tensor_lr(device):
    run_parity(
        fused_optim.Adam,
        torch.optim.Adam,
        {"lr": torch.tensor(0.05), "weight_decay": 0.1},
        device=device,
        scheduler=lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    )

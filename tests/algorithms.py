"""One table of named configurations per algorithm, covering every option and their combinations;
the generic tests run each through the parity harness."""

import torch

from parity import Config

ALGORITHMS = {
    "SGD": [
        Config("defaults"),
        Config("lr", {"lr": 0.1}),
        Config("weight_decay", {"lr": 0.1, "weight_decay": 0.1}),
        Config("momentum", {"lr": 0.1, "momentum": 0.9}),
        Config("momentum + dampening", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
        Config("nesterov", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        Config("maximize", {"lr": 0.1, "maximize": True}),
        Config("tensor lr and weight_decay", {"lr": torch.tensor(0.1), "weight_decay": torch.tensor(0.05)}),
        Config(
            "everything",
            {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.05, "maximize": True},
        ),
    ],
    "Adagrad": [
        Config("defaults"),
        Config("lr_decay", {"lr": 0.1, "lr_decay": 0.05}),
        Config("weight_decay", {"lr": 0.1, "weight_decay": 0.1}),
        Config("initial_accumulator_value", {"lr": 0.1, "initial_accumulator_value": 0.5}),
        Config("large eps", {"lr": 0.1, "eps": 1e-2}),
        Config("maximize", {"lr": 0.1, "maximize": True}),
        Config(
            "everything",
            {
                "lr": 0.1,
                "lr_decay": 0.01,
                "weight_decay": 0.05,
                "initial_accumulator_value": 0.2,
                "eps": 1e-6,
                "maximize": True,
            },
        ),
    ],
    "Adadelta": [
        Config("defaults"),
        Config("rho", {"rho": 0.5}),
        Config("large eps", {"eps": 1e-2}),
        Config("weight_decay", {"weight_decay": 0.1}),
        Config("maximize", {"maximize": True}),
        Config("tensor lr", {"lr": torch.tensor(0.5)}),
        Config("everything", {"lr": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.05, "maximize": True}),
    ],
    "RMSprop": [
        Config("defaults"),
        Config("alpha", {"alpha": 0.9}),
        Config("large eps", {"eps": 1e-2}),
        Config("weight_decay", {"weight_decay": 0.1}),
        Config("momentum", {"momentum": 0.9}),
        Config("centered", {"centered": True}),
        Config("centered + momentum", {"centered": True, "momentum": 0.5}),
        Config("maximize", {"maximize": True}),
        Config(
            "everything",
            {
                "lr": 0.02,
                "alpha": 0.9,
                "eps": 1e-6,
                "weight_decay": 0.05,
                "momentum": 0.8,
                "centered": True,
                "maximize": True,
            },
        ),
    ],
    "NAdam": [
        Config("defaults"),
        Config("betas", {"betas": (0.8, 0.99)}),
        Config("momentum_decay", {"momentum_decay": 0.05}),
        Config("L2 weight_decay", {"weight_decay": 0.1}),
        Config("decoupled weight_decay", {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True}),
        Config("large eps", {"eps": 1e-2}),
        Config("maximize", {"maximize": True}),
        Config(
            "everything",
            {
                "lr": 0.01,
                "betas": (0.85, 0.95),
                "eps": 1e-6,
                "weight_decay": 0.05,
                "momentum_decay": 0.01,
                "decoupled_weight_decay": True,
                "maximize": True,
            },
        ),
    ],
    "RAdam": [
        # 10 steps cover both branches: rho_t passes 5 after a few steps at these betas.
        Config("defaults"),
        Config("betas", {"lr": 0.01, "betas": (0.8, 0.9)}),
        Config("L2 weight_decay", {"lr": 0.01, "weight_decay": 0.1}),
        Config("decoupled weight_decay", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
        Config("large eps", {"lr": 0.01, "eps": 1e-2}),
        Config("maximize", {"lr": 0.01, "maximize": True}),
        Config(
            "everything",
            {
                "lr": 0.01,
                "betas": (0.7, 0.9),
                "eps": 1e-6,
                "weight_decay": 0.05,
                "decoupled_weight_decay": True,
                "maximize": True,
            },
        ),
    ],
    "Adamax": [
        Config("defaults"),
        Config("betas", {"lr": 0.05, "betas": (0.6, 0.9)}),
        Config("large eps", {"lr": 0.05, "eps": 1e-2}),
        Config("weight_decay", {"lr": 0.05, "weight_decay": 0.1}),
        Config("maximize", {"lr": 0.05, "maximize": True}),
        Config("everything", {"lr": 0.05, "betas": (0.7, 0.95), "eps": 1e-6, "weight_decay": 0.05, "maximize": True}),
    ],
    "Rprop": [
        Config("defaults"),
        Config("lr", {"lr": 0.05}),
        Config("etas", {"lr": 0.02, "etas": (0.3, 1.5)}),
        Config("step_sizes clamp", {"lr": 0.05, "step_sizes": (1e-2, 0.08)}),
        Config("maximize", {"maximize": True}),
        Config("tensor lr", {"lr": torch.tensor(0.03)}),
        # values exact in bf16/fp16: torch's low-precision path rounds etas, bounds and the initial
        # step size (lr) to the param dtype, which the low-precision tests would otherwise measure
        Config("everything", {"lr": 2**-5, "etas": (0.375, 1.25), "step_sizes": (2**-10, 2**-4), "maximize": True}),
    ],
    "ASGD": [
        Config("defaults"),
        Config("lr", {"lr": 0.05}),
        Config("lambd and alpha", {"lr": 0.05, "lambd": 0.01, "alpha": 0.5}),
        Config("averaging from step 2", {"lr": 0.05, "t0": 2}),
        Config("weight_decay", {"lr": 0.05, "weight_decay": 0.1}),
        Config("maximize", {"lr": 0.05, "maximize": True}),
        Config("tensor lr", {"lr": torch.tensor(0.03)}),
        Config(
            "everything", {"lr": 0.05, "lambd": 0.01, "alpha": 0.6, "t0": 3, "weight_decay": 0.05, "maximize": True}
        ),
    ],
}

# Arguments torch rejects, per algorithm: fused_optim must raise the same error with the same text.
BAD_ARGS = {
    "SGD": [
        {"lr": -0.1},
        {"momentum": -0.5},
        {"weight_decay": -1.0},
        {"nesterov": True},
        {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
        {"lr": torch.tensor([0.1, 0.2])},
        {"fused": True, "foreach": True},
        {"fused": True, "differentiable": True},
    ],
    "Adagrad": [
        {"lr": -0.1},
        {"lr_decay": -1.0},
        {"weight_decay": -1.0},
        {"initial_accumulator_value": -1.0},
        {"eps": -1.0},
        {"fused": True, "foreach": True},
    ],
    "Adadelta": [{"lr": -1.0}, {"rho": 1.5}, {"rho": -0.1}, {"eps": -1.0}, {"weight_decay": -1.0}],
    "RMSprop": [{"lr": -1.0}, {"eps": -1.0}, {"momentum": -1.0}, {"weight_decay": -1.0}, {"alpha": -0.5}],
    "NAdam": [
        {"lr": -1.0},
        {"eps": -1.0},
        {"betas": (1.0, 0.9)},
        {"betas": (0.9, 1.0)},
        {"weight_decay": -1.0},
        {"momentum_decay": -1.0},
    ],
    "RAdam": [{"lr": -1.0}, {"eps": -1.0}, {"betas": (1.0, 0.9)}, {"betas": (0.9, -0.1)}, {"weight_decay": -1.0}],
    "Adamax": [{"lr": -1.0}, {"eps": -1.0}, {"betas": (1.0, 0.9)}, {"betas": (0.9, 1.5)}, {"weight_decay": -1.0}],
    "ASGD": [{"lr": -1.0}, {"weight_decay": -1.0}, {"lr": torch.tensor([0.1, 0.2])}],
    "Rprop": [{"lr": -1.0}, {"etas": (1.5, 1.2)}, {"etas": (0.5, 0.9)}, {"lr": torch.tensor([0.1, 0.2])}],
}


# fused_optim's own constructor arguments, after torch's, keyword-only, with their defaults
EXTENSIONS = [
    ("master_weights", False),
    ("stochastic_rounding", False),
    ("rounding_seed", 0),
    ("state_dtype", None),
    ("stochastic_state_rounding", False),
    ("max_grad_norm", None),
]

# Adam and AdamW have their own table in test_adam.py; the feature tests use these.
ADAM_EVERYTHING = {
    "Adam": {"lr": 0.03, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05, "amsgrad": True, "maximize": True},
    "AdamW": {"lr": 0.03, "betas": (0.7, 0.9), "weight_decay": 0.3, "amsgrad": True, "maximize": True},
}
EVERY_ALGORITHM = ["Adam", "AdamW", *ALGORITHMS]


def everything(name: str) -> dict:
    """The configuration of ``name`` that turns every option on."""
    if name in ADAM_EVERYTHING:
        return dict(ADAM_EVERYTHING[name])
    return next(c.kwargs for c in ALGORITHMS[name] if c.desc == "everything")

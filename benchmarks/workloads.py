"""What the suite measures: algorithms with their arguments, and parameter lists (shapes only)."""

from __future__ import annotations

from dataclasses import dataclass

# name -> constructor arguments used for every provider
ALGORITHMS: dict[str, dict] = {
    "Adam": {"lr": 1e-3},
    "AdamW": {"lr": 1e-3, "weight_decay": 0.01},
    "SGD": {"lr": 1e-2, "momentum": 0.9},
    "Adagrad": {"lr": 1e-2},
    "Adadelta": {},
    "RMSprop": {"lr": 1e-3},
    "NAdam": {},
    "RAdam": {},
    "Adamax": {},
    "Rprop": {},
    "ASGD": {},
    "Adafactor": {},  # on matrices (``matrices``): the factored second moment
    "Muon": {},  # its own workload, on transformer matrices (torch >= 2.9)
    # beyond torch.optim: timed against their reference implementations (benchmarks/baselines.py)
    "LAMB": {"lr": 1e-3, "weight_decay": 0.01},
    "LARS": {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4},
    "Lion": {"lr": 1e-4, "weight_decay": 0.1},
    "AdEMAMix": {"lr": 1e-3, "weight_decay": 0.01, "weight_decouple": True},
    "StableAdamW": {"lr": 1e-3, "weight_decay": 0.01},
    "ScheduleFreeAdamW": {"lr": 2.5e-3, "weight_decay": 0.01},
}
# Algorithms whose tensors in the algorithms workload (and the parity table) are matrices of the
# same sizes as the others' vectors: Adafactor factors the second moment of a matrix only.
MATRIX_ALGORITHMS = {"Adafactor"}
BLOCK_ROW_RECIPES = {"int8 states", "fp8 states"}  # features recipes on rows of whole 8-bit blocks


@dataclass
class Point:
    """One measured configuration: a list of parameter shapes, labelled for tables and plots."""

    workload: str  # "sizes", "counts", "models", "algorithms", "features", "host", "muon"
    label: str
    shapes: list[tuple[int, ...]]
    x: int  # the swept quantity: total params (sizes), tensor count (counts), else total params

    @property
    def n_params(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    def shapes_for(self, algorithm: str) -> list[tuple[int, ...]]:
        """The shapes ``algorithm`` runs on: matrices of the same sizes for ``MATRIX_ALGORITHMS``,
        rows of whole 8-bit blocks for ``BLOCK_ROW_RECIPES``."""
        if algorithm in BLOCK_ROW_RECIPES:
            return block_rows(self.shapes)
        return matrices(self.shapes) if algorithm in MATRIX_ALGORITHMS else self.shapes


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def split(total: int, tensors: int) -> list[tuple[int, ...]]:
    """``total`` elements over ``tensors`` 1-D tensors of (nearly) equal size."""
    base, extra = divmod(total, tensors)
    return [(base + (1 if i < extra else 0),) for i in range(tensors)]


def matrices(shapes) -> list[tuple[int, ...]]:
    """Each shape as a matrix of the same number of elements, as square as its divisors allow
    (2^20: 1024 x 1024), every other one transposed (tall and wide both present)."""
    out = []
    for i, shape in enumerate(shapes):
        n = _numel(shape)
        rows = max((r for r in range(1, int(n**0.5) + 1) if n % r == 0), default=1)
        out.append((rows, n // rows) if i % 2 == 0 else (n // rows, rows))
    return out


def block_rows(shapes, row: int = 1024) -> list[tuple[int, ...]]:
    """Each shape as rows of ``row`` elements (a whole number of 256-element blocks of 8-bit states)."""
    assert all(_numel(s) % row == 0 for s in shapes), shapes
    return [(_numel(s) // row, row) for s in shapes]


def size_sweep(exponents, tensors: int = 64) -> list[Point]:
    return [Point("sizes", f"2^{e} params / {tensors} tensors", split(2**e, tensors), 2**e) for e in exponents]


def count_sweep(total_exp: int, counts) -> list[Point]:
    return [Point("counts", f"2^{total_exp} params / {n} tensors", split(2**total_exp, n), n) for n in counts]


def gpt2(n_layer=12, n_embd=768, vocab=50257, ctx=1024) -> list[tuple[int, ...]]:
    """GPT-2 (small by default) parameter shapes, as Hugging Face lays them out (Conv1D: in, out)."""
    shapes = [(vocab, n_embd), (ctx, n_embd)]
    for _ in range(n_layer):
        shapes += [(n_embd,), (n_embd,), (n_embd, 3 * n_embd), (3 * n_embd,), (n_embd, n_embd), (n_embd,)]
        shapes += [(n_embd,), (n_embd,), (n_embd, 4 * n_embd), (4 * n_embd,), (4 * n_embd, n_embd), (n_embd,)]
    return [*shapes, (n_embd,), (n_embd,)]


def llama(n_layer=16, hidden=2048, intermediate=8192, kv_dim=512, vocab=128256) -> list[tuple[int, ...]]:
    """Llama-3.2-1B-like parameter shapes (tied embeddings, grouped-query attention)."""
    shapes = [(vocab, hidden)]
    for _ in range(n_layer):
        shapes += [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden)]
        shapes += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate), (hidden,), (hidden,)]
    return [*shapes, (hidden,)]


def transformer_matrices(n_layer=12, n_embd=768) -> list[tuple[int, ...]]:
    """The 2-D weights of a GPT-2-like block stack (Hugging Face's Conv1D layout, in x out), the
    params Muon is meant for: per layer the qkv projection, the attention output, the MLP's up and
    down projections (embeddings, biases and norms left out, as Muon users give those to AdamW)."""
    return [(n_embd, 3 * n_embd), (n_embd, n_embd), (n_embd, 4 * n_embd), (4 * n_embd, n_embd)] * n_layer


def _muon(n_layer: int, n_embd: int, label: str) -> Point:
    shapes = transformer_matrices(n_layer, n_embd)
    return Point("muon", f"{label}: {n_layer} x 4 matrices", shapes, sum(_numel(s) for s in shapes))


def plan(cuda: bool, quick: bool) -> dict[str, list[Point]]:
    """The points of every workload: full sizes on CUDA, tiny ones through the CPU interpreter."""
    if cuda and not quick:
        return {
            "sizes": size_sweep(range(16, 29, 2)),
            "counts": count_sweep(25, [1, 4, 16, 64, 256, 1024, 4096]),
            "models": [
                Point("models", "GPT-2 small (124M)", gpt2(), 0),
                Point("models", "Llama 1B-like (1.24B)", llama(), 0),
            ],
            "algorithms": [Point("algorithms", "2^26 params / 64 tensors", split(2**26, 64), 2**26)],
            "features": [Point("features", "2^26 params / 64 tensors", split(2**26, 64), 2**26)],
            "host": [Point("host", "1,000 tensors of 4,096", split(1000 * 4096, 1000), 1000)],
            "muon": [_muon(12, 768, "GPT-2 small blocks (85M)")],
        }
    if cuda:  # quick
        return {
            "sizes": size_sweep(range(16, 27, 4)),
            "counts": count_sweep(22, [1, 64, 4096]),
            "models": [Point("models", "GPT-2 small (124M)", gpt2(), 0)],
            "algorithms": [Point("algorithms", "2^22 params / 64 tensors", split(2**22, 64), 2**22)],
            "features": [Point("features", "2^22 params / 64 tensors", split(2**22, 64), 2**22)],
            "host": [Point("host", "1,000 tensors of 4,096", split(1000 * 4096, 1000), 1000)],
            "muon": [_muon(4, 768, "GPT-2 small blocks (28M)")],
        }
    return {  # CPU: tiny, through the interpreter; not performance figures
        "sizes": size_sweep(range(8, 13, 2), tensors=4),
        "counts": count_sweep(12, [1, 4, 16]),
        "models": [
            Point("models", "GPT-2-like, tiny", gpt2(n_layer=2, n_embd=32, vocab=256, ctx=64), 0),
            Point("models", "Llama-like, tiny", llama(n_layer=2, hidden=32, intermediate=64, kv_dim=8, vocab=256), 0),
        ],
        "algorithms": [Point("algorithms", "2^12 params / 4 tensors", split(2**12, 4), 2**12)],
        "features": [Point("features", "2^14 params / 4 tensors", split(2**14, 4), 2**14)],  # 8-bit: >= 4,096 each
        "host": [Point("host", "1,000 tensors of 16", split(1000 * 16, 1000), 1000)],
        "muon": [_muon(4, 16, "GPT-2-like blocks, tiny")],
    }


# Which algorithms each workload runs (the sweeps use the ones torch also fuses, for comparison).
WORKLOAD_ALGORITHMS = {
    "sizes": ["Adam", "AdamW", "SGD"],
    "counts": ["Adam", "AdamW", "SGD"],
    "models": ["AdamW"],
    "algorithms": [a for a in ALGORITHMS if a != "Muon"],  # Muon: 2-D params only, its own workload
    "features": [
        "AMP",
        "clip",
        "master bf16",
        "bf16 states",
        "stochastic bf16",
        "capturable",
        "int8 states",
        "fp8 states",
    ],  # AdamW recipes
    "host": ["Adam", "AdamW", "SGD"],
    "muon": ["Muon"],  # torch's per-param loop against batched Newton-Schulz (torch >= 2.9)
}

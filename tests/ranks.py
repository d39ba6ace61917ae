"""Rank programs for the multi-process tests (test_distributed.py): each runs in every process of
a small gloo (CPU) or NCCL (CUDA) job started by ``run_ranks``, and raises on any mismatch."""

from __future__ import annotations

import copy
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))  # the spawned ranks import the helpers beside this file

import fused_optim
from algorithms import EVERY_ALGORITHM, everything
from parity import TOL, close

RUN = TOL[torch.float32][1]
EXACT = {"rtol": 0.0, "atol": 0.0}

try:  # torch >= 2.6
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - torch 2.4 / 2.5
    try:
        from torch.distributed._composable.fsdp import fully_shard
    except ImportError:
        fully_shard = None


# --- launching ------------------------------------------------------------------------------------
# Two ranks: gloo on CPU, NCCL with a GPU each; a one-GPU machine runs the same programs as 1 rank.
WORLD = 2 if not torch.cuda.is_available() or torch.cuda.device_count() >= 2 else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world: int, *args) -> None:
    """Run ``fn(*args)`` in ``world`` fresh processes joined in one process group. A job that
    fails for another reason than a failed check (the rendezvous port taken meanwhile, a
    connection reset while gloo sets up, a rank aborted by gloo with SIGABRT, seen once in a
    full run and not reproduced alone) runs once more on a new port; a failed check never does."""
    import torch.multiprocessing as mp

    for attempt in range(2):
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        try:
            mp.spawn(_rank_main, args=(world, fn, args), nprocs=world, join=True)
            return
        except mp.ProcessRaisedException as err:
            if attempt or "AssertionError" in str(err):
                raise
            print(f"distributed job failed outside the checks, running it again:\n{err}", file=sys.stderr)
        except mp.ProcessExitedException as err:  # killed by a signal: no check ran to completion
            if attempt:
                raise
            print(f"a rank died ({err}), running the job again", file=sys.stderr)


def _rank_main(rank: int, world: int, fn, args) -> None:
    if os.environ.get("FUSED_OPTIM_TEST_FALLBACK") == "1":  # test_cpu_fallback.py: torch.optim's code path
        from fused_optim.kernels import INTERPRETED

        assert not INTERPRETED, "FUSED_OPTIM_TEST_FALLBACK=1 but the kernels run through the interpreter"
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        fn(*args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# --- models -----------------------------------------------------------------------------------------
def mlp(seed: int = 0) -> torch.nn.Module:
    """The same small MLP on every rank (odd sizes, so FSDP2's dim-0 shards are uneven)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 19), torch.nn.Tanh(), torch.nn.Linear(19, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)
    )
    return model.to(_device())


def fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def batch(step: int, rank: int):
    """Rank ``rank``'s inputs and targets at ``step``."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 8, generator=gen).to(_device()), torch.randn(6, 3, generator=gen).to(_device())


def train_step(model, opt, step: int, clip: float | None = None):
    """One step on this rank's own batch; returns the total grad norm when clipping."""
    x, y = batch(step, dist.get_rank())
    torch.nn.functional.mse_loss(model(x), y).backward()
    norm = None
    if clip is not None:
        if isinstance(opt, fused_optim.FusedOptimizer):
            norm = opt.clip_grad_norm_(clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad()
    return norm


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


# torch.optim algorithms whose torch code DTensor cannot run (Rprop assigns through boolean masks
# and _foreach_copy_ has no sharding rule): element-wise, so torch's result on each local shard is
# the sharded result, and the FSDP2 reference runs torch there.
NOT_ON_DTENSOR = {"Rprop"}


class OnLocalShards:
    """torch.optim ``cls`` on the local shards of DTensor params; state read back as DTensors."""

    def __init__(self, cls, params, **kwargs):
        self.params = list(params)
        self.shards = [p.to_local().detach() for p in self.params]  # the params' local storage
        self.opt = cls(self.shards, foreach=False, **kwargs)

    def step(self):
        for p, shard in zip(self.params, self.shards):
            shard.grad = None if p.grad is None else p.grad.to_local()
        self.opt.step()

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @property
    def state(self):
        from torch.distributed.tensor import DTensor

        def as_param(v, p):
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                return v
            return DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

        return {p: {k: as_param(v, p) for k, v in self.opt.state[s].items()} for p, s in zip(self.params, self.shards)}


def compare(model, opt, ref_model, ref_opt, tol, where: str) -> None:
    """Params and every state key, shard by shard; state tensors sharded exactly as their param."""
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        close(_local(p).detach(), _local(q).detach(), tol, f"{name} {where}")
        mine, theirs = opt.state[p], ref_opt.state[q]
        assert set(mine) == set(theirs), (name, sorted(mine), sorted(theirs))
        for key, value in theirs.items():
            assert type(mine[key]) is type(value), (name, key, type(mine[key]), type(value))
            if hasattr(value, "placements"):
                assert mine[key].placements == value.placements == p.placements, (name, key)
            close(_local(mine[key]).to(_local(value)), _local(value), tol, f"{key} of {name} {where}")


# --- rank programs --------------------------------------------------------------------------------
def _parity(names: list[str], wrap, clip_name: str | None = None) -> None:
    for name in names:
        model, ref_model = wrap(mlp()), wrap(mlp())
        opt = getattr(fused_optim, name)(model.parameters(), **everything(name))
        ref_cls = getattr(torch.optim, name)
        if name in NOT_ON_DTENSOR and wrap is fsdp2:
            ref = OnLocalShards(ref_cls, ref_model.parameters(), **everything(name))
        else:
            ref = ref_cls(ref_model.parameters(), foreach=False, **everything(name))
        clip = 0.5 if name == clip_name else None
        for step in range(4):
            train_step(model, opt, step, clip)
            train_step(ref_model, ref, step, clip)
            compare(model, opt, ref_model, ref, RUN, f"{name} step {step + 1} rank {dist.get_rank()}")


def fsdp2_parity(names: list[str]) -> None:
    """Every algorithm on FSDP2-sharded params (DTensors) against torch.optim on the same setup."""
    _parity(names, fsdp2)


def fsdp2_clip() -> None:
    """The global norm over every rank's shards, and the clipped steps, equal torch's."""
    for max_norm in (0.05, 1e3):
        model, ref_model = fsdp2(mlp()), fsdp2(mlp())
        opt = fused_optim.AdamW(model.parameters(), lr=0.05)
        ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, foreach=False)
        for step in range(3):
            ours = train_step(model, opt, step, clip=max_norm)
            theirs = train_step(ref_model, ref, step, clip=max_norm)
            theirs = theirs.full_tensor() if hasattr(theirs, "full_tensor") else theirs
            close(ours, theirs, {"rtol": 1e-6, "atol": 0.0}, f"total norm step {step + 1}")
            compare(model, opt, ref_model, ref, RUN, f"clip {max_norm} step {step + 1}")


def fsdp2_whole_tensors(name: str, kwargs: dict) -> None:
    """An optimizer whose update needs each whole tensor (Muon: whole updates gathered and
    orthogonalized; LAMB, LARS: norms added up over the ranks) on FSDP2-sharded params, against
    the same algorithm in one process on whole params with the same grads (FSDP2's, gathered):
    torch.optim's class where it has one, else fused_optim's own (tested against the formulas).
    The same steps, to fp32 rounding. Every rank joins every whole-tensor gather, its own shard
    empty or not."""
    torch.manual_seed(0)
    # uneven dim-0 shards; one shape twice; a matrix of one row, whose shard on rank 1 is empty
    sizes = [(8, 19), (19, 13), (13, 13), (13, 13), (13, 1), (1, 3)]
    layers = [torch.nn.Linear(i, o, bias=False) for i, o in sizes]
    ref_model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())][:-1]).to(_device())
    model = fsdp2(copy.deepcopy(ref_model))
    ref_cls = getattr(torch.optim, name, None) or getattr(fused_optim, name)
    opt, ref = getattr(fused_optim, name)(model.parameters(), **kwargs), ref_cls(ref_model.parameters(), **kwargs)
    from fused_optim._fallback import uses_triton

    for step in range(3):
        x, y = batch(step, dist.get_rank())
        torch.nn.functional.mse_loss(model(x), y).backward()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            q.grad = p.grad.full_tensor()
        if not uses_triton(_device()):  # torch's code would orthogonalize shards: refused, nothing changes
            before = [p.full_tensor() for p in model.parameters()]
            try:
                opt.step()
            except NotImplementedError as err:
                assert "needs the Triton kernels" in str(err) or "Triton kernels do not" in str(err), err
            else:
                raise AssertionError(f"{name} ran torch's code on DTensor shards")
            assert all(torch.equal(p.full_tensor(), b) for p, b in zip(model.parameters(), before))
            return
        opt.step()
        opt.zero_grad()
        ref.step()
        ref.zero_grad()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            where = f"{name} step {step + 1} rank {dist.get_rank()}"
            for key, value in ref.state[q].items():
                mine = opt.state[p][key]
                if key != "step":
                    assert mine.placements == p.placements, where
                    mine = mine.full_tensor()
                close(mine, value, RUN, f"{key} of {where}")
            close(p.full_tensor().detach(), q.detach(), RUN, where)


def ddp_parity(names: list[str]) -> None:
    """Every algorithm on DDP-replicated params against torch.optim on the same setup (AdamW clipped)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    _parity(names, DDP, clip_name="AdamW")


def dcp_save_and_restore(folder: str) -> None:
    """Save model and optimizer with torch.distributed.checkpoint, restore them into fresh ones
    (fused_optim and torch.optim), and check the restored states and the steps that follow."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def restore(optimizer_cls, **kwargs):
        model = fsdp2(mlp(seed=7))  # other weights: all of them must come from the checkpoint
        opt = optimizer_cls(model.parameters(), lr=0.02, weight_decay=0.1, **kwargs)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=folder)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        return model, opt

    model = fsdp2(mlp())
    opt = fused_optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    for step in range(3):
        train_step(model, opt, step)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=folder)
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save(full, Path(folder) / "full_optim.pt")

    mine, mine_opt = restore(fused_optim.AdamW)
    theirs, theirs_opt = restore(torch.optim.AdamW, foreach=False)
    compare(mine, mine_opt, model, opt, EXACT, "after restoring")
    compare(theirs, theirs_opt, model, opt, EXACT, "torch.optim after restoring")
    for step in range(3, 5):
        for m, o in ((model, opt), (mine, mine_opt), (theirs, theirs_opt)):
            train_step(m, o, step)
        compare(mine, mine_opt, model, opt, EXACT, f"restored, step {step + 1}")
        compare(theirs, theirs_opt, model, opt, RUN, f"torch.optim restored, step {step + 1}")


def dcp_reshard(folder: str) -> None:
    """Load a checkpoint saved by a 2-rank job into a job of another size: the full state equals
    the one the 2-rank job gathered."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = fsdp2(mlp(seed=7))
    opt = fused_optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    state = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=folder)
    set_optimizer_state_dict(model, opt, state["optim"])
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    saved = torch.load(Path(folder) / "full_optim.pt", weights_only=False)
    assert full["state"].keys() == saved["state"].keys()
    for fqn, entry in saved["state"].items():
        assert full["state"][fqn].keys() == entry.keys(), fqn
        for key, value in entry.items():
            close(full["state"][fqn][key], value, EXACT, f"{key} of {fqn} after resharding")
    assert [{k: v for k, v in g.items() if k != "params"} for g in full["param_groups"]] == [
        {k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]
    ]


ALL = EVERY_ALGORITHM


# --- README snippets (test_docs.py) ---------------------------------------------------------------
class Blocks(torch.nn.Module):
    """A model with ``.layers``, as the FSDP2 snippet expects."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 19), torch.nn.Linear(19, 3)])

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


def _loader(batches: int):
    gen = torch.Generator().manual_seed(dist.get_rank())
    return [(torch.randn(6, 8, generator=gen).to(_device()), torch.randn(6, 3, generator=gen).to(_device()))] * batches


def docs_fsdp2(train: str, checkpoint: str, folder: str) -> None:
    """The FSDP2 snippet trains with DTensor state; the DCP snippet restores that state into a
    fresh model and optimizer built by the same snippet."""
    ns = {"model": Blocks().to(_device()), "loader": _loader(3), "checkpoint_dir": folder}
    exec(train, ns)
    model, opt = ns["model"], ns["opt"]
    saved = []
    for p in model.parameters():
        state = opt.state[p]
        assert float(state["step"]) == 3 and state["exp_avg"].placements == p.placements
        saved.append({k: _local(v).clone() for k, v in state.items()})
    cut = checkpoint.index("# later")  # the snippet's second half restores
    save, load = checkpoint[:cut], checkpoint[cut:]
    exec(save, ns)
    fresh = {"model": Blocks(seed=5).to(_device()), "loader": [], "checkpoint_dir": folder}
    exec(train, fresh)  # sharded again, optimizer built again, no step taken
    fresh.update({k: ns[k] for k in ("dcp", "get_optimizer_state_dict", "set_optimizer_state_dict")})
    exec(load, fresh)
    for p, expected in zip(fresh["model"].parameters(), saved):
        for key, value in expected.items():
            close(_local(fresh["opt"].state[p][key]), value, EXACT, f"{key} after the DCP snippet")


def docs_ddp(code: str) -> None:
    """The DDP snippet: the same update as torch's clip then AdamW, and replicas that stay equal."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ns = {"model": Blocks().to(_device()), "loader": _loader(3)}
    exec(code, ns)
    ref_model = DDP(Blocks().to(_device()))
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-4, foreach=False)
    for x, y in _loader(3):
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
        ref.step()
        ref.zero_grad()
    compare(ns["model"], ns["opt"], ref_model, ref, RUN, "after the DDP snippet")
    flat = torch.cat([p.detach().reshape(-1) for p in ns["model"].parameters()])
    replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(replicas, flat)
    assert all(torch.equal(r, flat) for r in replicas)


# --- 8-bit states (test_quantized_distributed.py) ----------------------------------------------------
# Linear layers as (in, out): weights 256x256 (rows split 128/128) and 33x256 (17/16) get 8-bit
# states; 8x33 (too small, rows not whole blocks) and the biases keep fp32 states.
QUANT_SIZES = [(256, 256), (256, 33), (33, 8)]


def quant_mlp(sizes=QUANT_SIZES, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [m for i, o in sizes for m in (torch.nn.Linear(i, o), torch.nn.Tanh())][:-1]
    return torch.nn.Sequential(*layers).to(_device())


def _shard(full: torch.Tensor, p) -> torch.Tensor:
    """``full`` (the same whole tensor on every rank) sharded as the DTensor ``p`` is: local
    slicing, no communication (FSDP2's rows of each rank)."""
    from torch.distributed.tensor import DTensor, Replicate

    whole = DTensor.from_local(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    return whole.redistribute(p.device_mesh, p.placements)


def _rows(full: torch.Tensor, p) -> torch.Tensor:
    return _shard(full, p).to_local()


def quant_grads(model: torch.nn.Module, step: int) -> list[torch.Tensor]:
    """Whole grads for ``step``, the same on every rank and in every job."""
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(_device()) for p in model.parameters()]


def set_quant_grads(model: torch.nn.Module, step: int) -> None:
    """The grads of ``step`` (``quant_grads``), as this rank's shards for DTensor params."""
    for p, g in zip(model.parameters(), quant_grads(model, step)):
        p.grad = _shard(g, p) if hasattr(p, "placements") else g


def bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """The same dtype, shape and bytes (fp8 codes included, which torch.equal does not compare)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (what, actual.dtype, expected.dtype)
    a, e = actual.detach().reshape(-1), expected.detach().reshape(-1)
    assert torch.equal(a.view(torch.uint8), e.view(torch.uint8)), f"{what}: {(a.float() - e.float()).abs().max()}"


def quant_state(model, opt) -> dict:
    """{param name: {"param": p, state key: value}}, local shards of DTensors, copied to the CPU."""
    out = {}
    for name, p in model.named_parameters():
        entry = {k: _local(v).detach().cpu().clone() for k, v in opt.state[p].items()}
        entry["param"] = _local(p).detach().cpu().clone()
        out[name] = entry
    return out


def compare_rows(model, opt, ref_model, ref_opt, where: str) -> None:
    """Each FSDP2 param and state (local shards) against the same rows of the one-process ones,
    bit for bit; state keys, dtypes, global shapes and placements the same too."""
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        here = f"{name} {where} rank {dist.get_rank()}"
        bits_equal(p.to_local(), _rows(q.detach(), p), here)
        mine, theirs = opt.state[p], ref_opt.state[q]
        assert set(mine) == set(theirs), (here, sorted(mine), sorted(theirs))
        for key, value in theirs.items():
            if key == "step":
                assert float(mine[key]) == float(value), here
                continue
            assert mine[key].placements == p.placements and mine[key].shape == value.shape, (here, key)
            bits_equal(mine[key].to_local(), _rows(value, p), f"{key} of {here}")


def fsdp2_8bit_parity(state_dtype, kwargs: dict, sizes=QUANT_SIZES) -> None:
    """fused_optim.AdamW with 8-bit states on FSDP2-sharded params against the same optimizer in
    one process on whole params, with the same whole grads: per-element fp32 math on the same
    dequantized states and blocks inside rows, so params, codes and scales are bit-equal, each
    rank holding its rows. ``dequantized_state_dict`` gives the same rows too."""
    from fused_optim._quant import MIN_NUMEL, QB, quantizes

    ref_model = quant_mlp(sizes)
    model = fsdp2(copy.deepcopy(ref_model))
    opt = fused_optim.AdamW(model.parameters(), state_dtype=state_dtype, **kwargs)
    ref = fused_optim.AdamW(ref_model.parameters(), state_dtype=state_dtype, **kwargs)
    for step in range(3):
        set_quant_grads(model, step)
        set_quant_grads(ref_model, step)
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        compare_rows(model, opt, ref_model, ref, f"step {step + 1}")
    for name, p in model.named_parameters():  # the 8-bit params are the ones the rule picks
        assert ("exp_avg_codes" in opt.state[p]) == quantizes(p, state_dtype), name
        assert ("exp_avg_codes" in opt.state[p]) == (p.dim() == 2 and p.numel() >= MIN_NUMEL and p.shape[1] % QB == 0)
    mine, theirs = opt.dequantized_state_dict()["state"], ref.dequantized_state_dict()["state"]
    for (index, state), p in zip(sorted(theirs.items()), model.parameters()):
        for key, value in state.items():
            if key != "step":
                assert mine[index][key].placements == p.placements, (index, key)
                bits_equal(mine[index][key].to_local(), _rows(value, p), f"dequantized {key} of param {index}")


def _dcp_modules():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    return dcp, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict


def _dcp_save(model, opt, folder: str) -> None:
    dcp, get_model, get_optim, _, _ = _dcp_modules()
    dcp.save({"model": get_model(model), "optim": get_optim(model, opt)}, checkpoint_id=folder)


def _dcp_restore(model, opt, folder: str) -> None:
    dcp, get_model, get_optim, set_model, set_optim = _dcp_modules()
    state = {"model": get_model(model), "optim": get_optim(model, opt)}
    dcp.load(state, checkpoint_id=folder)
    set_model(model, state["model"])
    set_optim(model, opt, state["optim"])


def _saved_8bit(folder: Path, state_dtype) -> None:
    """The checkpoint holds the 8-bit weights' moments as ``state_dtype`` codes and fp32 scales
    (``[rows, row // QB]``), not dequantized, and the other params' moments in fp32."""
    import torch.distributed.checkpoint as dcp

    from fused_optim._quant import QB

    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    for name, (rows, row) in {"0.weight": (256, 256), "2.weight": (33, 256)}.items():
        for key in ("exp_avg", "exp_avg_sq"):
            codes, scales = saved[f"optim.state.{name}.{key}_codes"], saved[f"optim.state.{name}.{key}_scales"]
            assert codes.properties.dtype == state_dtype and codes.size == (rows, row), (name, key, codes)
            assert scales.properties.dtype == torch.float32 and scales.size == (rows, row // QB), (name, key, scales)
            assert f"optim.state.{name}.{key}" not in saved, (name, key)
    for name in ("0.bias", "2.bias", "4.weight", "4.bias"):
        assert saved[f"optim.state.{name}.exp_avg"].properties.dtype == torch.float32, name
        assert f"optim.state.{name}.exp_avg_codes" not in saved, name


def _gathered(folder: Path, what: str) -> dict:
    """What the ranks of a job saved with ``quant_state`` (``{what}_rank{r}.pt``), their rows put
    together in rank order: the whole tensors."""
    parts = [torch.load(f, weights_only=False) for f in sorted(folder.glob(f"{what}_rank*.pt"))]
    return {
        name: {k: v if v.dim() == 0 else torch.cat([part[name][k] for part in parts]) for k, v in entry.items()}
        for name, entry in parts[0].items()
    }


def _same_state(model, opt, expected: dict, where: str) -> None:
    """``model``'s params and ``opt``'s state equal ``expected`` (whole tensors) bit for bit, each
    rank holding its rows of them for DTensor params."""
    params, actual = dict(model.named_parameters()), quant_state(model, opt)
    assert actual.keys() == expected.keys(), where
    for name, entry in expected.items():
        p = params[name]
        assert actual[name].keys() == entry.keys(), (name, where, sorted(actual[name]), sorted(entry))
        for key, whole in entry.items():
            value = _rows(whole.to(_device()), p).cpu() if hasattr(p, "placements") and whole.dim() else whole
            bits_equal(actual[name][key], value, f"{key} of {name} {where} rank {dist.get_rank()}")


def dcp_8bit_save(folder: str, state_dtype) -> None:
    """2 ranks: FSDP2 training with 8-bit states, saved with torch.distributed.checkpoint after 3
    steps; what each rank held then and after 2 more steps goes to files for the 1-rank job."""
    folder = Path(folder)
    model = fsdp2(quant_mlp())
    opt = fused_optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1, state_dtype=state_dtype)
    for step in range(5):
        if step == 3:
            _dcp_save(model, opt, str(folder / "two"))
            torch.save(quant_state(model, opt), folder / f"saved_rank{dist.get_rank()}.pt")
        set_quant_grads(model, step)
        opt.step()
        opt.zero_grad()
    torch.save(quant_state(model, opt), folder / f"continued_rank{dist.get_rank()}.pt")


def dcp_8bit_load_whole(folder: str, state_dtype) -> None:
    """1 rank, unsharded model: the 2-rank checkpoint loads into a fresh 8-bit AdamW (other
    weights, no state) as the codes and scales the 2 ranks held, gathered, bit for bit; the next 2
    steps equal those the 2-rank job took. Then saves its own checkpoint for ``dcp_8bit_load_sharded``."""
    folder = Path(folder)
    model = quant_mlp(seed=7)  # other weights: all of them must come from the checkpoint
    opt = fused_optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1, state_dtype=state_dtype)
    _saved_8bit(folder / "two", state_dtype)
    _dcp_restore(model, opt, str(folder / "two"))
    _same_state(model, opt, _gathered(folder, "saved"), "loaded from 2 ranks")
    for step in range(3, 5):
        set_quant_grads(model, step)
        opt.step()
        opt.zero_grad()
    _same_state(model, opt, _gathered(folder, "continued"), "resumed from 2 ranks")
    _dcp_save(model, opt, str(folder / "one"))
    torch.save(quant_state(model, opt), folder / "saved_one.pt")
    set_quant_grads(model, 5)
    opt.step()
    torch.save(quant_state(model, opt), folder / "continued_one.pt")


def dcp_8bit_load_sharded(folder: str, state_dtype) -> None:
    """2 ranks: the 1-rank checkpoint loads into FSDP2 params, each rank holding its rows of the
    saved codes and scales; the next step equals the one-process step, row for row."""
    folder = Path(folder)
    model = fsdp2(quant_mlp(seed=7))
    opt = fused_optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1, state_dtype=state_dtype)
    _saved_8bit(folder / "one", state_dtype)
    _dcp_restore(model, opt, str(folder / "one"))
    _same_state(model, opt, torch.load(folder / "saved_one.pt", weights_only=False), "loaded from 1 rank")
    set_quant_grads(model, 5)
    opt.step()
    _same_state(model, opt, torch.load(folder / "continued_one.pt", weights_only=False), "resumed from 1 rank")

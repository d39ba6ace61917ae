"""8-bit states (``state_dtype=torch.int8`` / ``torch.float8_e4m3fn``) under FSDP2 and
torch.distributed.checkpoint, in real multi-process jobs (gloo on CPU, kernels through the
interpreter; NCCL on CUDA). Blocks lie inside rows and FSDP2 shards rows, so each rank's codes and
scales are its rows of the one-process ones, bit for bit, and checkpoints reshard with the rows."""

import pytest
import torch
import torch.distributed as dist

import fused_optim
import ranks as d
from parity import one_rank_mesh

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch is built without torch.distributed")
needs_fsdp2 = pytest.mark.skipif(d.fully_shard is None, reason="FSDP2 (fully_shard) needs torch >= 2.4")
WORLD = d.WORLD
STATE_DTYPES = [
    pytest.param(torch.int8, {"lr": 0.01, "weight_decay": 0.1}, id="int8"),
    pytest.param(torch.float8_e4m3fn, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}, id="fp8-amsgrad"),
]


@needs_fsdp2
@pytest.mark.parametrize(("state_dtype", "kwargs"), STATE_DTYPES)
def test_fsdp2_8bit_states_are_the_rows_of_the_one_process_states(state_dtype, kwargs):
    """Weights of 256 and 33 rows (33: uneven shards), biases and a small weight with fp32 states,
    the same grads: params, codes and scales equal the one-process run's rows bit for bit."""
    d.run_ranks(d.fsdp2_8bit_parity, WORLD, state_dtype, kwargs)


@needs_fsdp2
@pytest.mark.skipif(WORLD < 2, reason="needs 2 ranks")
def test_fsdp2_8bit_states_of_a_param_with_fewer_rows_than_ranks():
    """Linear(4096, 1).weight (1 x 4096, 8-bit) over 2 ranks: rank 1 holds none of its rows, and
    an empty shard of codes and scales, and still takes the one-process steps with rank 0."""
    d.run_ranks(d.fsdp2_8bit_parity, WORLD, torch.int8, {"lr": 0.01}, [(4096, 1)])


@needs_fsdp2
@pytest.mark.parametrize("state_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_distributed_checkpoint_of_8bit_states_reshards_2_to_1_to_2(tmp_path, state_dtype):
    """Saved by a 2-rank FSDP2 job, loaded by one process into an unsharded model: the codes and
    scales the ranks held, put together, and the same next steps as the 2-rank job. Saved again
    there and loaded by a 2-rank job: each rank holds its rows, and steps as the one process does."""
    d.run_ranks(d.dcp_8bit_save, WORLD, str(tmp_path), state_dtype)
    d.run_ranks(d.dcp_8bit_load_whole, 1, str(tmp_path), state_dtype)
    d.run_ranks(d.dcp_8bit_load_sharded, WORLD, str(tmp_path), state_dtype)


def test_8bit_states_refuse_params_sharded_by_columns(device):
    """Shard(1) would split blocks between ranks: the step that first meets such a param raises
    before anything changes (the other param's value and 8-bit state included)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_rank_mesh(device) as mesh:
        rows = torch.nn.Parameter(distribute_tensor(torch.randn(32, 256, device=device), mesh, [Shard(0)]))
        cols = torch.nn.Parameter(distribute_tensor(torch.randn(32, 256, device=device), mesh, [Shard(1)]))
        opt = fused_optim.AdamW([rows], lr=0.01, state_dtype=torch.int8)
        rows.grad = distribute_tensor(torch.randn(32, 256, device=device), mesh, [Shard(0)])
        opt.step()
        assert "exp_avg_codes" in opt.state[rows]
        opt.add_param_group({"params": [cols]})
        cols.grad = distribute_tensor(torch.randn(32, 256, device=device), mesh, [Shard(1)])
        before = {p: p.to_local().clone() for p in (rows, cols)}
        state = {k: d._local(v).clone() for k, v in opt.state[rows].items()}
        with pytest.raises(NotImplementedError, match=r"Shard\(0\)"):
            opt.step()
        assert all(torch.equal(p.to_local(), value) for p, value in before.items())
        assert set(opt.state) == {rows} and opt.state[rows].keys() == state.keys()
        for key, value in state.items():
            d.bits_equal(d._local(opt.state[rows][key]), value, key)

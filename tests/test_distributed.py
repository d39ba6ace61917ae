"""fused_optim under FSDP2 (DTensor params, kernels on each rank's shards), DDP, and
torch.distributed.checkpoint, in real multi-process jobs: gloo on CPU (kernels through the
interpreter), NCCL on CUDA. Each rank checks its own shards against torch.optim on the same setup."""

import pytest
import torch.distributed as dist

import ranks as d

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch is built without torch.distributed")
needs_fsdp2 = pytest.mark.skipif(d.fully_shard is None, reason="FSDP2 (fully_shard) needs torch >= 2.4")
WORLD = d.WORLD


@needs_fsdp2
def test_fsdp2_every_algorithm_matches_torch_on_the_same_shards():
    d.run_ranks(d.fsdp2_parity, WORLD, d.ALL)


@needs_fsdp2
def test_fsdp2_global_norm_clip_matches_torch():
    d.run_ranks(d.fsdp2_clip, WORLD)


@needs_fsdp2
@pytest.mark.skipif(not hasattr(d.torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_fsdp2_muon_matches_torch_in_one_process():
    d.run_ranks(d.fsdp2_whole_tensors, WORLD, "Muon", {"lr": 0.02, "weight_decay": 0.1})


@needs_fsdp2
@pytest.mark.parametrize(
    ("name", "kwargs"), [("LAMB", {"lr": 0.02, "weight_decay": 0.1}), ("LARS", {"lr": 0.5, "weight_decay": 0.01})]
)
def test_fsdp2_trust_ratios_use_whole_tensor_norms(name, kwargs):
    """LAMB's and LARS's norms are the whole tensor's: each rank's shares are added up between
    the two launches, so the sharded steps equal the one-process steps."""
    d.run_ranks(d.fsdp2_whole_tensors, WORLD, name, kwargs)


def test_ddp_every_algorithm_matches_torch():
    d.run_ranks(d.ddp_parity, WORLD, d.ALL)


@needs_fsdp2
def test_distributed_checkpoint_round_trip_and_resharding(tmp_path):
    """Saved by a 2-rank FSDP2 job, restored into fused_optim and into torch.optim (identical
    states, then identical steps), and loaded again by a 1-rank job (resharded)."""
    d.run_ranks(d.dcp_save_and_restore, WORLD, str(tmp_path))
    d.run_ranks(d.dcp_reshard, 1, str(tmp_path))

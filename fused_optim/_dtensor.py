"""DTensor params (FSDP2, tensor parallel): the kernels run on each rank's local shard.

A DTensor param's state is a DTensor placed like the param; its grads are read as local shards;
its share of a global grad norm is reduced over the mesh dims its placements shard.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # built without distributed
    DTensor = None

PARTIAL = ("partial",)  # norm class of a param with a Partial placement: not clipped


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The tensor the kernels work on: a DTensor's local shard, or the tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def like_param(local_tensor: torch.Tensor, param: torch.Tensor, shape=None) -> torch.Tensor:
    """``local_tensor`` (shaped like ``param``'s local shard) as ``param`` is seen: a DTensor with
    its mesh and placements for a DTensor param, else ``local_tensor`` itself. ``shape``: the
    global shape of a contiguous state placed like the param but shaped otherwise (the scales of
    8-bit states, sharded along the same rows)."""
    if not is_dtensor(param):
        return local_tensor
    if local_tensor.storage_offset():
        # The same memory as a tensor of its own, at storage offset 0: a DTensor made from a view at
        # an offset reports a nonzero data_ptr, which sends copy.deepcopy down the path of real
        # storages, and it fails ("invalid python storage"): deep-copying a state_dict would.
        local_tensor = torch.utils.dlpack.from_dlpack(local_tensor)
    if shape is None:
        shape, stride = param.shape, param.stride()
    else:
        stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local_tensor, param.device_mesh, param.placements, run_check=False, shape=shape, stride=stride
    )


def shard_like(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's shard of ``full`` (a whole tensor, the same on every rank) as ``param`` is
    placed: local slicing, no communication."""
    from torch.distributed.tensor import Replicate

    mesh = param.device_mesh
    whole = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, param.placements).to_local()


def real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors are updated as their real view, as torch.optim does; DTensors as their
    local shard."""
    t = local(t)
    return torch.view_as_real(t) if t.is_complex() else t


def mesh_device(mesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


def norm_class(p):
    """How a param's share of a global grad norm is combined across ranks: None for a plain
    tensor (or a replicated DTensor), else (mesh, the mesh dims its placements shard)."""
    if not is_dtensor(p):
        return None
    if any(placement.is_partial() for placement in p.placements):
        return PARTIAL
    dims = tuple(dim for dim, placement in enumerate(p.placements) if not placement.is_replicate())
    return (p.device_mesh, dims) if dims else None

"""The torch fallback: where the Triton kernels cannot run (CPU without the interpreter), and for
sparse grads, the update is torch.optim's own single-tensor code, with AMP, clipping and master
weights applied around it, on the same state tensors."""

from __future__ import annotations

import inspect
import sys
import warnings

import torch

from . import _dtensor
from .kernels import INTERPRETED

_warned = False


def uses_triton(device: torch.device) -> bool:
    """Whether the kernels run on ``device`` (else torch.optim's own implementation does)."""
    return (device.type == "cuda" and not INTERPRETED) or (device.type == "cpu" and INTERPRETED)


def warn_fallback(device: torch.device) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"fused_optim: parameters on {device.type} run through torch.optim's own implementation "
            "(the Triton kernels need CUDA, or TRITON_INTERPRET=1 set before importing fused_optim "
            "to run them on CPU through Triton's interpreter).",
            stacklevel=5,
        )


_LIST_KEYS = {"state_steps": "step", "state_sums": "sum"}


def _state_key(list_name: str) -> str:
    """The state key behind one of torch's functional list arguments (``exp_avg_sqs``,
    ``momentum_buffer_list``, ``state_steps``)."""
    if list_name in _LIST_KEYS:
        return _LIST_KEYS[list_name]
    return list_name.removesuffix("_list") if list_name.endswith("_list") else list_name.removesuffix("s")


# torch's functional arguments that are one element of a group's pair
_PAIRS = {
    "beta1": ("betas", 0),
    "beta2": ("betas", 1),
    "etaminus": ("etas", 0),
    "etaplus": ("etas", 1),
    "step_size_min": ("step_sizes", 0),
    "step_size_max": ("step_sizes", 1),
    "eps1": ("eps", 0),
    "eps2": ("eps", 1),
}


class FallbackMixin:
    """torch's implementation inside ``FusedOptimizer``."""

    def _torch_functional(self, group):
        """The functional form of ``_torch_cls`` (``torch.optim.adam.adam``)."""
        return getattr(sys.modules[self._torch_cls.__module__], self._torch_cls.__name__.lower())

    def _reference(self, group, params, grads, states, fresh) -> None:
        """One step of torch's single-tensor code on ``params`` with ``states`` (our views), its
        arguments read from its signature: the state lists by name, hyperparameters from the group.
        State that torch creates from the first grad (``fresh``) is handed over as None and copied
        into our view afterwards."""
        fn = self._torch_functional(group)
        signature = inspect.signature(fn).parameters
        names = list(signature)
        active = set(self._tensor_state_keys(group)) | set(self._scalar_state)
        fresh_keys = set(self._fresh_keys(group))
        lists, kwargs = {}, {}
        for name in names[2:]:
            arg = signature[name]
            if arg.kind is not arg.POSITIONAL_OR_KEYWORD or arg.default is not arg.empty:
                break
            key = _state_key(name)
            lists[key] = (
                [None if new and key in fresh_keys else s.get(key) for s, new in zip(states, fresh)]
                if key in active
                else []
            )
        for name in names[2 + len(lists) :]:
            if name in _PAIRS:
                key, index = _PAIRS[name]
                kwargs[name] = group[key][index]
            elif name == "has_complex":
                kwargs[name] = any(torch.is_complex(p) for p in params)
            elif name == "has_sparse_grad":
                kwargs[name] = any(g.is_sparse for g in grads)
            elif name in ("foreach", "fused", "capturable", "differentiable"):
                kwargs[name] = False
            elif name in group:
                kwargs[name] = group[name]
        fn(params, grads, *lists.values(), **kwargs)
        for key in fresh_keys & set(lists):  # torch's new tensors: into our views, or kept as torch's
            for state, new, value in zip(states, fresh, lists[key]):
                if new:
                    state[key].copy_(value)
                elif value is not None and state.get(key) is not value:
                    dict.__setitem__(state, key, value)

    def _run_reference(self, group, launch, grads, inputs) -> None:
        """torch's implementation for a launch whose device the kernels cannot run on."""
        seg = launch.seg  # options only the kernels honour were refused by _check_fallback
        if inputs.found_inf is not None and bool(inputs.found_inf):  # this path runs on CPU: no sync to avoid
            return
        rows = launch.rows.tolist()
        # DTensor params: torch's element-wise code runs on the local shards, as the kernels do
        # (some of it has no sharding rule: Rprop's masked assignments), with their state's shards
        members = [seg.members[i] for i in rows]
        params = [_dtensor.local(p) for p in members]
        grads = [_dtensor.local(grads[seg.group_index[i]]) for i in rows]
        factor = inputs.factor()
        if factor is not None:
            grads = [g * factor.to(g.device) for g in grads]
        states = [
            {k: _dtensor.local(v) for k, v in self.state[p].items()} if _dtensor.is_dtensor(p) else self.state[p]
            for p in members
        ]
        fresh = [i in seg.fresh for i in rows]
        if seg.master:  # update the fp32 master copies, then round them into the params
            masters = [s["master_param"] for s in states]
            self._reference(group, masters, [g.to(m.dtype) for g, m in zip(grads, masters)], states, fresh)
            for p, m in zip(params, masters):
                p.copy_(m)
        else:
            self._reference(group, params, grads, states, fresh)

    def _run_sparse(self, group, positions: list[int], grads) -> None:
        params = [group["params"][i] for i in positions]
        stateful = self._scalar_state or self._tensor_state_keys(group)
        self._reference(
            group,
            params,
            [_uncoalesced(grads[i]) for i in positions],
            [self.state[p] if stateful else {} for p in params],
            [False] * len(params),
        )


def _uncoalesced(grad: torch.Tensor) -> torch.Tensor:
    """A coalesced sparse grad as the same entries marked uncoalesced. torch's CPU ``add_`` of a
    coalesced sparse tensor into a dense view that starts past the beginning of its storage (our
    state: views into flat buffers) writes at twice the view's offset, outside the view (torch
    2.13); the uncoalesced path adds where it should. torch.optim's own state never starts there."""
    if not grad.is_sparse or not grad.is_coalesced():
        return grad
    return torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, check_invariants=False)

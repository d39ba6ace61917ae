"""state_dict interchange with torch.optim, both directions, in memory and through files."""

import copy
import pickle

import pytest
import torch

import fused_optim
from parity import SHAPES, assert_same, leaves, one_rank_mesh, random_tensors, set_grads

KWARGS = {"lr": 0.05, "amsgrad": True, "weight_decay": 0.1}
TOL = {"rtol": 1e-5, "atol": 1e-6}
EXACT = {"rtol": 0, "atol": 0}


def _no_grad_for_first(step, i):
    return i == 0 or (i == 2 and step == 1)  # param 0 never gets state; param 2 falls one step behind


def _trained(cls, device, steps=4):
    params = leaves(random_tensors(SHAPES, torch.float32, 0, device))
    opt = cls(params, **KWARGS)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if _no_grad_for_first(step, i) else torch.randn_like(p)
        opt.step()
    return opt, params


@pytest.mark.parametrize("via_file", [False, True], ids=["in memory", "torch.save file"])
@pytest.mark.parametrize("direction", ["fused to torch", "torch to fused"])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_interchange_and_continue(name, direction, via_file, device, tmp_path):
    fused_cls, torch_cls = getattr(fused_optim, name), getattr(torch.optim, name)
    src_cls, dst_cls = (fused_cls, torch_cls) if direction == "fused to torch" else (torch_cls, fused_cls)
    src, src_params = _trained(src_cls, device)
    state_dict = src.state_dict()
    if via_file:
        torch.save(state_dict, tmp_path / "optim.pt")
        state_dict = torch.load(tmp_path / "optim.pt")
    else:  # torch.optim keeps loaded tensors that need no cast: without a copy both would share state
        state_dict = copy.deepcopy(state_dict)
    dst_params = leaves([p.detach() for p in src_params])
    dst = dst_cls(dst_params, lr=0.5)  # hyperparameters come from the state dict
    dst.load_state_dict(state_dict)
    assert dst.param_groups[0]["lr"] == KWARGS["lr"] and dst.param_groups[0]["amsgrad"]
    assert_same(dst, src, dst_params, src_params, EXACT, "right after loading")
    if isinstance(dst, fused_optim.FusedOptimizer):  # the flat buffers hold the loaded values
        seg = next(iter(dst._caches[0].segments.values()))
        for p in dst_params[1:]:
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                assert dst.state[p][key].untyped_storage().data_ptr() == seg.flat[key].untyped_storage().data_ptr()
    for step in range(5):  # training continues identically
        set_grads(dst_params, src_params, step, 7)
        dst.step()
        src.step()
        assert_same(dst, src, dst_params, src_params, TOL, f"{step + 1} steps after loading")


def test_state_dict_layout_matches_torch(device):
    ours, _ = _trained(fused_optim.AdamW, device)
    theirs, _ = _trained(torch.optim.AdamW, device)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid, state in b["state"].items():
        assert list(a["state"][pid]) == list(state), pid
        assert type(a["state"][pid]) is dict
        assert a["state"][pid]["step"].dtype == state["step"].dtype and a["state"][pid]["step"].device.type == "cpu"
    assert b"fused_optim" not in pickle.dumps(a)  # loads without fused_optim installed


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_unchanged(opt, before):
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for pid, state in before["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(after["state"][pid][key], value, rtol=0, atol=0)


def test_rejects_mismatched_shapes_before_modifying(device):
    src, _ = _trained(torch.optim.Adam, device)
    state_dict = src.state_dict()
    dst, _ = _trained(fused_optim.Adam, device, steps=2)
    wrong = copy.deepcopy(state_dict)
    wrong["state"][6]["exp_avg"] = torch.zeros(65, 33)  # param 6 has shape (33, 65)
    wrong["param_groups"][0]["lr"] = 123.0
    before = _snapshot(dst)
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 6 of param group 0 has shape \(65, 33\)"):
        dst.load_state_dict(wrong)
    _assert_unchanged(dst, before)
    missing = copy.deepcopy(state_dict)
    del missing["state"][3]["max_exp_avg_sq"]
    with pytest.raises(ValueError, match="has no tensor 'max_exp_avg_sq'"):
        dst.load_state_dict(missing)
    _assert_unchanged(dst, before)


@pytest.mark.parametrize("change", ["group count", "group size"])
def test_rejects_mismatched_groups_like_torch(change, device):
    src, _ = _trained(fused_optim.Adam, device)
    state_dict = src.state_dict()
    if change == "group count":
        state_dict["param_groups"].append(dict(state_dict["param_groups"][0], params=[]))
    else:
        state_dict["param_groups"][0]["params"].pop()
    dst, _ = _trained(fused_optim.Adam, device, steps=2)
    ref, _ = _trained(torch.optim.Adam, device, steps=2)
    before = _snapshot(dst)
    with pytest.raises(ValueError) as theirs:
        ref.load_state_dict(copy.deepcopy(state_dict))
    with pytest.raises(ValueError) as ours:
        dst.load_state_dict(state_dict)
    assert str(ours.value) == str(theirs.value)
    _assert_unchanged(dst, before)


def test_load_state_dict_hooks_still_run(device):
    src, _ = _trained(torch.optim.Adam, device)
    dst, _ = _trained(fused_optim.Adam, device, steps=1)
    seen = []

    def pre(opt, state_dict):
        seen.append("pre")
        state_dict["param_groups"][0]["lr"] = 0.25
        return state_dict

    dst.register_load_state_dict_pre_hook(pre)
    dst.register_load_state_dict_post_hook(lambda opt: seen.append(("post", opt.param_groups[0]["lr"])))
    dst.load_state_dict(src.state_dict())
    assert seen == ["pre", ("post", 0.25)]


def test_state_dict_with_dtensor_params_deep_copies_and_stays_live(device):
    """DTensor state entries are live (a step shows in them) and a state_dict holding several of
    them deep-copies, as torch.optim's does (views at an offset in the flat buffers used to make
    DTensors whose deepcopy failed)."""
    import copy

    from torch.distributed.tensor import Shard, distribute_tensor

    import fused_optim

    with one_rank_mesh(device) as mesh:
        params = [
            torch.nn.Parameter(distribute_tensor(torch.randn(4, 3, device=device), mesh, [Shard(0)])) for _ in range(3)
        ]
        opt = fused_optim.Adam(params, lr=0.1)
        for p in params:
            p.grad = distribute_tensor(torch.randn(4, 3, device=device), mesh, [Shard(0)])
        opt.step()
        views = [opt.state[p]["exp_avg"] for p in params]
        copied = copy.deepcopy(opt.state_dict())
        opt.step()  # the same grads again: exp_avg moves, in the live views only
        for view, (i, saved) in zip(views, sorted(copied["state"].items())):
            assert torch.equal(view.full_tensor(), opt.state[params[i]]["exp_avg"].full_tensor())
            assert not torch.equal(view.full_tensor(), saved["exp_avg"].full_tensor())

"""Large-model training features in the same kernels, for every algorithm: AMP with GradScaler,
global-norm clipping, fp32 master weights, bf16 stochastic rounding, low-precision states and
capturable steps, each against a torch reference."""

import copy
import inspect
import math

import pytest
import torch

import fused_optim
from algorithms import EVERY_ALGORITHM, everything
from parity import (
    SHAPES,
    TOL,
    NoHostReads,
    assert_same,
    clip_side_by_side,
    close,
    leaves,
    random_tensors,
    set_grads,
    stochastic_rounding_side_by_side,
)

RUN = TOL[torch.float32][1]
NAMES = EVERY_ALGORITHM
CAPTURABLE = [n for n in NAMES if "capturable" in inspect.signature(getattr(torch.optim, n).__init__).parameters]


def _pair(name, device, dtype=torch.float32, seed=0, **options):
    init = random_tensors(SHAPES, dtype, seed, device)
    params, ref_params = leaves(init), leaves(init)
    kwargs = everything(name)
    return (
        getattr(fused_optim, name)(params, **kwargs, **options),
        getattr(torch.optim, name)(ref_params, foreach=False, **kwargs),
        params,
        ref_params,
    )


# --- AMP ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_skips_inf_steps_inside_the_kernels(name, device):
    """fused_optim takes GradScaler's scale and inf flag into its kernels; torch.optim goes through
    GradScaler's unscale_ and host-side skip. Same params, states, step counts and scales."""
    opt, ref, params, ref_params = _pair(name, device)
    assert opt._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler(device.type, init_scale=2.0**12, growth_interval=3) for _ in range(2)]
    for step in range(8):
        weights = random_tensors(SHAPES, torch.float32, 50 + step, device)
        if step in (2, 5):
            weights[1].view(-1)[7] = float("inf") if step == 2 else float("nan")
        for o, ps, scaler in ((opt, params, scalers[0]), (ref, ref_params, scalers[1])):
            loss = sum((p * w).sum() for p, w in zip(ps, weights))
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
            o.zero_grad()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_same(opt, ref, params, ref_params, RUN, f"after step {step + 1}")
    if opt._scalar_state:  # two skipped steps: step counts did not advance, on the device
        assert float(opt.state[params[0]]["step"]) == 6
        assert opt._amp_steps


def test_unscale_then_clip_then_step_with_grad_scaler(device):
    """The usual AMP recipe with clipping: scaler.unscale_, clip, scaler.step."""
    opt, ref, params, ref_params = _pair("AdamW", device)
    scalers = [torch.amp.GradScaler(device.type, init_scale=2.0**8) for _ in range(2)]
    for step in range(5):
        weights = random_tensors(SHAPES, torch.float32, 70 + step, device)
        norms = []
        for o, ps, scaler in ((opt, params, scalers[0]), (ref, ref_params, scalers[1])):
            scaler.scale(sum((p * w).sum() for p, w in zip(ps, weights))).backward()
            scaler.unscale_(o)
            if o is opt:
                norms.append(opt.clip_grad_norm_(1.0))
            else:
                norms.append(torch.nn.utils.clip_grad_norm_(ps, 1.0))
            scaler.step(o)
            scaler.update()
            o.zero_grad()
        torch.testing.assert_close(norms[0], norms[1], rtol=1e-6, atol=0)
        assert_same(opt, ref, params, ref_params, RUN, f"after step {step + 1}")


def test_grad_scale_and_found_inf_as_arguments(device):
    opt, ref, params, ref_params = _pair("Adam", device)
    scale = torch.tensor(1024.0, device=device)
    for step in range(4):
        set_grads(params, ref_params, step, 0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        skip = step == 1
        opt.step(grad_scale=scale, found_inf=torch.tensor(float(skip), device=device))
        if not skip:
            ref.step()
        assert_same(opt, ref, params, ref_params, RUN, f"after step {step + 1}")


# --- clipping ----------------------------------------------------------------------------------
@pytest.mark.parametrize("max_norm", [0.5, 1e4], ids=["clips", "under the norm"])
@pytest.mark.parametrize("name", NAMES)
def test_clip_grad_norm_then_step_matches_torch(name, max_norm, device):
    opt, ref, params, ref_params = _pair(name, device)
    for step in range(5):
        set_grads(params, ref_params, step, 0, grad_none=lambda s, i: (s + i) % 4 == 0)
        ours = opt.clip_grad_norm_(max_norm)
        theirs = torch.nn.utils.clip_grad_norm_([q for q in ref_params if q.grad is not None], max_norm)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0, msg=f"total norm at step {step + 1}")
        opt.step()
        ref.step()
        assert_same(opt, ref, params, ref_params, RUN, f"after step {step + 1}")


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_max_grad_norm_clips_inside_step(name, device):
    opt, ref, params, ref_params = _pair(name, device, max_grad_norm=0.7)
    check = lambda where: assert_same(opt, ref, params, ref_params, RUN, where)  # noqa: E731
    clip_side_by_side(opt, ref, params, ref_params, check, steps=4)


def test_clip_inf_norm_and_error_if_nonfinite(device):
    opt, ref, params, ref_params = _pair("Adam", device)
    set_grads(params, ref_params, 0, 2)
    ours = opt.clip_grad_norm_(0.1, norm_type=math.inf)
    # torch's foreach inf-norm refuses empty tensors; ours treats them as contributing nothing
    nonempty = [q for q in ref_params if q.grad is not None and q.numel()]
    theirs = torch.nn.utils.clip_grad_norm_(nonempty, 0.1, norm_type=math.inf)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    opt.step()
    ref.step()
    assert_same(opt, ref, params, ref_params, RUN, "after an inf-norm clip")
    with pytest.raises(NotImplementedError, match="norm_type=1"):
        opt.clip_grad_norm_(1.0, norm_type=1.0)
    params[1].grad.view(-1)[3] = float("nan")
    ref_params[1].grad.view(-1)[3] = float("nan")
    messages = []
    for clip, ps in ((opt.clip_grad_norm_, None), (torch.nn.utils.clip_grad_norm_, ref_params)):
        with pytest.raises(RuntimeError) as err:
            clip(1.0, error_if_nonfinite=True) if ps is None else clip(ps, 1.0, error_if_nonfinite=True)
        messages.append(str(err.value))
    assert messages[0] == messages[1]


def test_clip_with_a_nonfinite_norm_does_what_torch_does(device):
    opt, ref, params, ref_params = _pair("SGD", device)
    set_grads(params, ref_params, 0, 3)
    params[0].grad.view(-1)[2] = float("inf")
    ref_params[0].grad.view(-1)[2] = float("inf")
    ours = opt.clip_grad_norm_(1.0)
    theirs = torch.nn.utils.clip_grad_norm_([q for q in ref_params if q.grad is not None], 1.0)
    assert torch.isinf(ours) and torch.isinf(theirs)
    opt.step()
    ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, equal_nan=True, rtol=1e-6, atol=1e-7)


def test_zero_grad_drops_a_pending_clip(device):
    opt, ref, params, ref_params = _pair("Adam", device)
    set_grads(params, ref_params, 0, 0)
    opt.clip_grad_norm_(1e-3)
    opt.zero_grad()
    set_grads(params, ref_params, 1, 0)
    opt.step()
    ref.step()
    assert_same(opt, ref, params, ref_params, RUN, "after zero_grad dropped the clip")


def test_clips_compose_as_torchs_do(device):
    """Two ``clip_grad_norm_`` calls before a step, and one with ``max_grad_norm`` set: each clip
    measures the grads as the clips before it left them (torch clips them in place), so the
    second call returns the clipped norm and the step uses both coefficients."""
    for two_calls in (True, False):
        opt, ref, params, ref_params = _pair("SGD", device, **({} if two_calls else {"max_grad_norm": 0.3}))
        for step in range(3):
            set_grads(params, ref_params, step, 4)
            with_grads = [q for q in ref_params if q.grad is not None]
            ours = [opt.clip_grad_norm_(1.0), *([opt.clip_grad_norm_(0.5)] if two_calls else [])]
            theirs = [torch.nn.utils.clip_grad_norm_(with_grads, 1.0)]
            theirs.append(torch.nn.utils.clip_grad_norm_(with_grads, 0.5 if two_calls else 0.3))
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=f"norm at step {step + 1}")
            opt.step()
            ref.step()
            assert_same(opt, ref, params, ref_params, RUN, f"{'two clips' if two_calls else 'max_grad_norm'} {step}")


@pytest.mark.parametrize("clear", ["new grads", "in place"])
def test_a_clip_is_dropped_when_its_grads_are(device, clear):
    """A clip whose grads are replaced without the optimizer's ``zero_grad()`` (a skipped step,
    then ``model.zero_grad()`` and a new backward) is not applied to the new grads: torch's clip
    scaled the old ones."""
    opt, ref, params, ref_params = _pair("Adam", device)
    set_grads(params, ref_params, 0, 0)
    assert opt.clip_grad_norm_(1e-3) > 0
    for p, q in zip(params, ref_params):
        if clear == "new grads":
            p.grad = q.grad = None
        elif p.grad is not None:
            p.grad.zero_()
    for p, q, g in zip(params, ref_params, random_tensors(SHAPES, torch.float32, 7, device)):
        if clear == "new grads":
            p.grad, q.grad = g.clone(), g.clone()
        elif p.grad is not None:
            p.grad.add_(g)
            q.grad = p.grad.clone()
    opt.step()
    ref.step()
    assert_same(opt, ref, params, ref_params, RUN, f"after the clip's grads were cleared ({clear})")


# --- master weights, state dtype ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_master_weights_follow_torch_on_fp32_copies(name, device):
    """bf16 params with fp32 master copies: the masters follow torch.optim on fp32 params exactly as
    fp32 parity does, and the bf16 params are the masters rounded."""
    init = random_tensors(SHAPES, torch.bfloat16, 0, device)
    params, ref_params = leaves(init), leaves([t.float() for t in init])
    opt = getattr(fused_optim, name)(params, **everything(name), master_weights=True)
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **everything(name))
    for step in range(6):
        grads = random_tensors(SHAPES, torch.bfloat16, 10 + step, device)
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            state, ref_state = opt.state[p], ref.state[q]
            close(state["master_param"], q, RUN, f"master of param {i} step {step + 1}")
            assert p.dtype == torch.bfloat16 and state["master_param"].dtype == torch.float32
            torch.testing.assert_close(p, q.to(torch.bfloat16), rtol=2**-7, atol=0)  # within one bf16 ulp
            for key, value in ref_state.items():
                if key != "step" and key != "mu_product":
                    assert state[key].dtype == torch.float32, key
                close(state[key], value, RUN, f"{key} of param {i} step {step + 1}")


def test_master_weights_state_dict_keeps_dtypes_and_loads_into_torch(device, tmp_path):
    init = random_tensors(SHAPES, torch.bfloat16, 0, device)
    params = leaves(init)
    opt = fused_optim.AdamW(params, master_weights=True)
    for step in range(3):
        for p, g in zip(params, random_tensors(SHAPES, torch.bfloat16, 20 + step, device)):
            p.grad = g
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    again = fused_optim.AdamW(leaves([p.detach() for p in params]), master_weights=True)
    again.load_state_dict(torch.load(tmp_path / "optim.pt"))
    for p, q in zip(params, again.param_groups[0]["params"]):
        for key, value in opt.state[p].items():
            assert again.state[q][key].dtype == value.dtype, key
            torch.testing.assert_close(again.state[q][key], value, rtol=0, atol=0)
    theirs = torch.optim.AdamW(leaves([p.detach() for p in params]))
    theirs.load_state_dict(torch.load(tmp_path / "optim.pt"))  # torch casts to bf16, ignores master_param
    assert theirs.state[theirs.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.bfloat16


def test_a_stale_master_copy_in_a_checkpoint_starts_again_from_the_param(device):
    """A checkpoint whose ``master_param`` no longer rounds to the param (torch.optim, which carries
    it along unused, trained the params in between) starts the master from the param: the first
    step does not throw that training away."""
    init = random_tensors(SHAPES, torch.bfloat16, 0, device)
    params = leaves(init)
    opt = fused_optim.AdamW(params, lr=0.1, master_weights=True)
    torch_opt = torch.optim.AdamW(params, lr=0.1, foreach=False)
    for step, o in enumerate([opt, opt, "load", torch_opt, torch_opt]):
        if o == "load":
            torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            continue
        for p, g in zip(params, random_tensors(SHAPES, torch.bfloat16, 30 + step, device)):
            p.grad = g
        o.step()
    trained = [p.detach().clone() for p in params]
    again = fused_optim.AdamW(params, master_weights=True)
    again.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for group in again.param_groups:
        group["lr"] = 0.0  # a step that moves nothing
    for p in params:
        p.grad = torch.ones_like(p)
    again.step()
    for i, (p, t) in enumerate(zip(params, trained)):
        assert torch.equal(p, t), i
        assert torch.equal(again.state[p]["master_param"], t.float()), i


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "NAdam", "Adagrad"])
def test_bf16_states_for_fp32_params(name, device):
    """state_dtype=bf16: fp32 math, states stored in bf16; the reference is torch.optim in fp32 with
    its states rounded to bf16 after every step."""
    opt, ref, params, ref_params = _pair(name, device, state_dtype=torch.bfloat16)
    with torch.no_grad():
        for q in ref_params:
            for key, value in ref.state[q].items():
                if key not in opt._scalar_state:
                    value.copy_(value.bfloat16().float())
    for step in range(6):
        set_grads(params, ref_params, step, 0)
        opt.step()
        ref.step()
        with torch.no_grad():
            for q in ref_params:
                for key, value in ref.state[q].items():
                    if key not in opt._scalar_state:
                        value.copy_(value.bfloat16().float())
        for i, (p, q) in enumerate(zip(params, ref_params)):
            close(p, q, RUN, f"param {i} step {step + 1}")
            for key, value in ref.state[q].items():
                mine = opt.state[p][key]
                if key not in opt._scalar_state:
                    assert mine.dtype == torch.bfloat16
                torch.testing.assert_close(mine.float(), value.float(), rtol=2 * 2**-7, atol=1e-12)


def test_bytes_per_step_with_master_weights_and_bf16_states(device):
    params = [torch.randn(100, device=device, dtype=torch.bfloat16, requires_grad=True)]
    opt = fused_optim.Adam(params, master_weights=True)
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    # param written (2), grad read (2), master read + written (8), two fp32 moments (16)
    assert opt.bytes_per_step() == 28 * 100
    q = [torch.randn(100, device=device, requires_grad=True)]
    opt = fused_optim.Adam(q, state_dtype=torch.bfloat16)
    q[0].grad = torch.randn_like(q[0])
    opt.step()
    assert opt.bytes_per_step() == (12 + 8) * 100  # fp32 param r/w + grad, two bf16 moments r/w


def test_options_are_checked():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="exclusive"):
        fused_optim.Adam(p, master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        fused_optim.Adam(p, state_dtype=torch.int16)
    with pytest.raises(ValueError, match="Invalid max_grad_norm"):
        fused_optim.Adam(p, max_grad_norm=-1.0)


def test_stochastic_rounding_refuses_fp16_params_before_changing_anything():
    kept = torch.randn(5, requires_grad=True)
    half = torch.randn(5, dtype=torch.float16, requires_grad=True)
    opt = fused_optim.SGD([kept, half], lr=0.1, stochastic_rounding=True)
    kept.grad, half.grad = torch.ones_like(kept), torch.ones_like(half)
    before = kept.detach().clone()
    with pytest.raises(NotImplementedError, match="stochastic_rounding"):
        opt.step()
    assert torch.equal(kept.detach(), before)


def test_options_survive_deepcopy_and_param_groups_stay_torchs():
    opt = fused_optim.Adam([torch.zeros(2, requires_grad=True)], master_weights=True, max_grad_norm=1.0)
    assert copy.deepcopy(opt).options == opt.options
    assert set(opt.param_groups[0]) == set(torch.optim.Adam([torch.zeros(2, requires_grad=True)]).param_groups[0])


# --- stochastic rounding ---------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased_and_within_one_ulp(device):
    """SGD moves every element of a bf16 param by 0.3 ulp: each element lands on one of the two
    neighbours of the exact value, the lower one with probability 0.3, so the mean is the exact value."""
    n, ulp = 2**16, 2.0**-7  # bf16 spacing in [1, 2)
    p = torch.full((n,), 1.5, device=device, dtype=torch.bfloat16, requires_grad=True)
    opt = fused_optim.SGD([p], lr=0.3 * ulp, stochastic_rounding=True)
    p.grad = torch.ones_like(p)
    opt.step()
    exact = 1.5 - 0.3 * ulp
    values = p.detach().double()
    assert set(values.unique().tolist()) <= {1.5, 1.5 - ulp}
    std = ulp * math.sqrt(0.3 * 0.7 / n)
    assert abs(values.mean().item() - exact) < 5 * std, (values.mean().item() - exact) / std
    first = (values < 1.5).clone()
    with torch.no_grad():
        p.fill_(1.5)
    opt.step()
    assert not torch.equal(first, p.detach() < 1.5)  # a new draw every step


@pytest.mark.parametrize("name", ["Adam", "RAdam", "Adagrad"])
def test_stochastic_rounding_stays_within_one_ulp_of_fp32(name, device):
    stochastic_rounding_side_by_side(
        lambda params: getattr(fused_optim, name)(params, lr=0.01, stochastic_rounding=True),
        lambda exact: getattr(torch.optim, name)(exact, lr=0.01, foreach=False),
        device,
    )


# --- capturable ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CAPTURABLE)
def test_capturable_matches_torch(name, device):
    """capturable=True: step counts on the param's device, step scalars computed in the kernel."""
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params, ref_params = leaves(init), leaves(init)
    opt = getattr(fused_optim, name)(params, **everything(name), capturable=True)
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **everything(name))
    for step in range(8):
        set_grads(params, ref_params, step, 0, grad_none=lambda s, i: (s + i) % 4 == 0)
        opt.step()
        ref.step()
        assert_same(opt, ref, params, ref_params, RUN, f"after step {step + 1}")
    stepped = [p for p in params if opt.state[p]]
    assert all(opt.state[p]["step"].device == p.device and opt.state[p]["step"].dtype == torch.float32 for p in stepped)


@pytest.mark.parametrize("name", CAPTURABLE)
def test_capturable_and_host_steps_give_identical_results(name, device):
    """Step scalars computed in the kernel (float64, from the device step count) equal the ones the
    host computes: params and every state key bit for bit, with grads None on some steps."""
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params, host_params = leaves(init), leaves(init)
    opt = getattr(fused_optim, name)(params, **everything(name), capturable=True)
    host = getattr(fused_optim, name)(host_params, **everything(name))
    for step in range(8):
        set_grads(params, host_params, step, 0, grad_none=lambda s, i: (s + i) % 4 == 0)
        opt.step()
        host.step()
        for i, (p, q) in enumerate(zip(params, host_params)):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"param {i} step {step + 1}")
            assert opt.state[p].keys() == host.state[q].keys()
            for key, value in host.state[q].items():
                mine = opt.state[p][key]
                torch.testing.assert_close(mine.to(value), value, rtol=0, atol=0, msg=f"{key} {i} {step + 1}")


@pytest.mark.parametrize("name", CAPTURABLE)
def test_capturable_step_reads_nothing_on_the_host(name, device):
    """A steady capturable step, with a tensor lr that a scheduler updates, GradScaler's AMP and
    clipping, reads no tensor value on the host."""
    params = leaves(random_tensors(SHAPES, torch.float32, 0, device))
    kwargs = dict(everything(name), lr=torch.tensor(0.01, device=device))
    opt = getattr(fused_optim, name)(params, **kwargs, capturable=True, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=256.0)
    weights = random_tensors(SHAPES, torch.float32, 1, device)
    for step in range(3):
        loss = sum((p * w).sum() for p, w in zip(params, weights))
        scaler.scale(loss).backward()
        if step == 0:
            scaler.step(opt)  # the first step builds tables and lays out state
        else:
            with NoHostReads():
                scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=False)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(0.01 * 0.9**3)


def test_capturable_with_a_tensor_lr_follows_a_scheduler(device):
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params, ref_params = leaves(init), leaves(init)
    opt = fused_optim.AdamW(params, lr=torch.tensor(0.05), capturable=True)
    ref = torch.optim.AdamW(ref_params, lr=0.05, foreach=False)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    for step in range(6):
        set_grads(params, ref_params, step, 0)
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
        assert_same(opt, ref, params, ref_params, RUN, f"after step {step + 1}")


def test_capturable_refuses_hyperparameters_on_an_accelerator():
    """Only lr is read by the kernels; a beta on an accelerator would be read on the host (a sync,
    and a failed graph capture). The meta device stands in for CUDA here."""
    p = torch.randn(3, requires_grad=True)
    opt = fused_optim.Adam([torch.randn(2, requires_grad=True)], capturable=True)
    opt.add_param_group({"params": [p], "betas": (torch.tensor(0.9, device="meta"), 0.99)})
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    with pytest.raises(NotImplementedError, match="betas"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU (runs on CUDA machines)")
@pytest.mark.parametrize("name", ["AdamW", "NAdam", "RAdam"])
def test_cuda_graph_replay_follows_eager_steps(name):
    """A whole capturable step (device step counts, a tensor lr updated in place by a scheduler,
    clipping) captured once in a CUDA graph and replayed equals the same steps run eagerly."""
    device = torch.device("cuda")
    init = random_tensors([(4096,), (33, 65), (7,)], torch.float32, 0, device)
    runs = []
    for capture in (True, False):
        params = leaves(init)
        for p in params:
            p.grad = torch.zeros_like(p)  # static grads: the graph reads them where they are
        kwargs = dict(everything(name), lr=torch.tensor(0.01, device=device))
        opt = getattr(fused_optim, name)(params, **kwargs, capturable=True, max_grad_norm=1.0)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream: compile, tables, state layout
            for step in range(3):
                for p, g in zip(params, random_tensors([p.shape for p in params], torch.float32, 100 + step, device)):
                    p.grad.copy_(g)
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = None
        if capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
        history = []
        for step in range(5):
            for p, g in zip(params, random_tensors([p.shape for p in params], torch.float32, 200 + step, device)):
                p.grad.copy_(g)
            graph.replay() if capture else opt.step()
            sched.step()  # writes the new lr into the same tensor
            history.append([p.detach().clone() for p in params])
        runs.append((history, opt, params))
    (captured, opt, params), (eager, ref, ref_params) = runs
    for step, (mine, theirs) in enumerate(zip(captured, eager)):
        for i, (a, b) in enumerate(zip(mine, theirs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"param {i} after replay {step + 1}")
    for p, q in zip(params, ref_params):
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=0, atol=0, msg=key)

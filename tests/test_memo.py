"""What the fused modules derive from their parameters and buffers (eval-mode BN folds, SK's
combined conv weight, concatenated vectors) is kept between calls (``splat/modules/_memo.py``):
reused while nothing changes, recomputed when anything does, never in autograd's way."""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import splat
from splat import backend as _backend
from splat.modules._memo import memo
from tests.helpers import DEVICE, backend_params, rand, randomize_bn
from tests.reference import Bottle2neck, SelectiveKernel, SKConv, SplAtConv2d, SplitAttn

# name: (reference builder, input channels); every fused block and the paths of its forward.
BLOCKS = {
    "splat": (lambda: SplAtConv2d(8, 8, 3, padding=1, radix=2, norm_layer=torch.nn.BatchNorm2d), 8),
    "splitattn-r4g2": (lambda: SplitAttn(8, 8, radix=4, groups=2), 8),
    "sk": (lambda: SKConv(8, 4, 2, 2, 2), 8),
    "timm-sk": (lambda: SelectiveKernel(8, 8, groups=2), 8),
    "res2net": (lambda: Bottle2neck(32, 8), 32),
}
# Ops that only the derived values use: none of them may run once those are kept.
DERIVING = {"aten::cat", "aten::rsqrt", "aten::ones", "aten::zeros", "aten::zeros_like", "aten::new_zeros",
            "aten::full", "aten::copy_", "aten::arange", "aten::_to_copy"}
KERNEL = "splat kernel"


def pair(name, backend):
    build, channels = BLOCKS[name]
    ref = randomize_bn(build().to(DEVICE).double()).eval()
    fused = splat.convert(copy.deepcopy(ref), backend=backend)
    return ref, fused, rand(2, channels, 6, 5)


def test_memo_keys():
    owner, t = torch.nn.Module(), rand(3)
    calls = []

    def compute():
        calls.append(None)
        return t * 2

    def check(inputs, computed):
        before = len(calls)
        value = memo(owner, "x", inputs, compute)
        assert len(calls) - before == computed
        torch.testing.assert_close(value, t * 2)

    check((t, 1.0), 1)
    check((t, 1.0), 0)
    t.add_(1)  # in place: the version changes
    check((t, 1.0), 1)
    check((t, 2.0), 1)  # another input
    check((t.clone(), 2.0), 1)  # another tensor
    t.data = rand(3)  # what module.to() does: new storage
    check((t, 2.0), 1)
    with torch.inference_mode():
        check((t, 2.0), 1)
    check((t, 2.0), 1)
    t.requires_grad_()
    check((t, 2.0), 1)  # autograd records: computed, and not kept
    check((t, 2.0), 1)
    with torch.no_grad():
        check((t, 2.0), 0)  # what was kept before autograd recorded is still right
    with torch.inference_mode():
        made_there = rand(3)
    check((made_there,), 1)  # no version counter to key on: not kept
    check((made_there,), 1)


def _called_by_splat(event) -> bool:
    """An ATen op that splat calls outside its kernels (not one that another op runs inside)."""
    if event.cpu_parent is not None and event.cpu_parent.name.startswith("aten::"):
        return False
    while event is not None:
        if event.name == KERNEL:
            return False
        event = event.cpu_parent
    return True


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("backend", backend_params())
def test_inference_recomputes_nothing(monkeypatch, backend, name):
    """A second eval forward under no_grad runs none of the ops that derive values from parameters
    (outside the kernels, which on the torch backend are ATen ops too)."""
    call = _backend.call

    def marked(*args):
        with torch.profiler.record_function(KERNEL):
            return call(*args)

    monkeypatch.setattr(_backend, "call", marked)
    ref, fused, x = pair(name, backend)
    with torch.no_grad():
        first = fused(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            second = fused(x)
    ran = {e.name for e in prof.events() if _called_by_splat(e)} & DERIVING
    assert not ran, f"the second forward recomputed derived values: {sorted(ran)}"
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("backend", backend_params())
def test_kept_values_follow_the_parameters(backend, name):
    """Changes of every kind after a first eval forward: in-place updates of parameters and
    statistics, load_state_dict, a dtype conversion, a training step, inference mode, autograd
    through eval-mode BN. Each time the output matches the reference's."""
    ref, fused, x = pair(name, backend)

    def check(dtype=torch.float64):
        with torch.no_grad():
            torch.testing.assert_close(fused(x.to(dtype)), ref(x.to(dtype)), rtol=1e-5, atol=1e-5)

    check()
    for module in (ref, fused):
        with torch.no_grad():
            for t in module.state_dict().values():
                if t.is_floating_point():
                    t.mul_(1.25)
    check()
    state = randomize_bn(copy.deepcopy(ref)).state_dict()
    ref.load_state_dict(state)
    fused.load_state_dict(state)
    # First after the change, so that inference mode makes the kept values.
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    # Frozen parameters and an input that requires grad: kept values enter autograd's graph, so
    # none made in inference mode may be among them.
    fused.requires_grad_(False)
    xr = x.detach().requires_grad_()
    fused(xr).sum().backward()
    torch.testing.assert_close(xr.grad, torch.func.grad(lambda t: ref(t).sum())(x), rtol=1e-5, atol=1e-5)
    fused.requires_grad_(True)
    check()
    # Eval-mode BN with gradients (a frozen backbone being fine-tuned): the folds carry their graph.
    xr = x.detach().requires_grad_()
    fused(xr).sum().backward()
    ref(x.detach().requires_grad_()).sum().backward()
    for (n, p), q in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=n)
    for module in (ref, fused):
        module.train()
        module(x).sum().backward()
        module.eval()
    check()
    ref.float()
    fused.float()
    check(torch.float32)

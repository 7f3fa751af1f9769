"""The constant tensors the fused modules keep between calls (``splat/modules/_constants.py``), and
the values they do not keep: whatever derives from parameters and buffers follows every change."""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import splat
from splat import backend as _backend
from splat.modules._constants import constant
from tests.helpers import DEVICE, backend_params, rand, randomize_bn
from tests.reference import Bottle2neck, SelectiveKernel, SKConv, SplAtConv2d, SplitAttn

# name: (reference builder, input channels); every fused block, with identity BNs (SplitAttn
# without norm layers) and SK's interleaved channel order (grouped branch convs).
BLOCKS = {
    "splat": (lambda: SplAtConv2d(8, 8, 3, padding=1, radix=2, norm_layer=torch.nn.BatchNorm2d), 8),
    "splitattn-r4g2": (lambda: SplitAttn(8, 8, radix=4, groups=2), 8),
    "sk": (lambda: SKConv(8, 4, 2, 2, 2), 8),
    "timm-sk": (lambda: SelectiveKernel(8, 8, groups=2), 8),
    "res2net": (lambda: Bottle2neck(32, 8), 32),
}
# Ops that make constants: none of them may run once the constants are kept.
MAKING = {"aten::ones", "aten::zeros", "aten::zeros_like", "aten::full", "aten::arange"}
KERNEL = "splat kernel"


def pair(name, backend):
    build, channels = BLOCKS[name]
    ref = randomize_bn(build().to(DEVICE).double()).eval()
    fused = splat.convert(copy.deepcopy(ref), backend=backend)
    return ref, fused, rand(2, channels, 6, 5)


def test_constant_keys():
    made = []

    def make():
        made.append(None)
        return torch.ones(3)

    key = ("test", 3, torch.float32)
    first = constant(key, make)
    assert constant(key, make) is first and len(made) == 1
    constant(("test", 4, torch.float32), make)
    assert len(made) == 2
    with torch.inference_mode():
        assert constant(key, make) is not first  # made there, kept apart
    assert constant(key, make) is first


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
def test_second_call_makes_no_constants(monkeypatch, backend, name):
    """A second forward makes no constant tensor (outside the kernels, which on the torch backend
    are ATen ops too), in eval mode and in training, with autograd recording."""
    call = _backend.call

    def marked(*args):
        with torch.profiler.record_function(KERNEL):
            return call(*args)

    monkeypatch.setattr(_backend, "call", marked)
    ref, fused, x = pair(name, backend)
    for train in (False, True):
        fused.train(train)
        fused(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fused(x)
        made = {e.name for e in prof.events() if _called_by_splat(e)} & MAKING
        assert not made, f"the second {'training' if train else 'eval'} forward made constants again: {sorted(made)}"


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("backend", backend_params())
def test_outputs_follow_the_parameters(backend, name):
    """Changes of every kind between eval forwards: in-place updates through ``.data`` (which no
    version counter sees: what EMA code does), in place under no_grad, load_state_dict, inference
    mode, frozen parameters with an input that requires grad, a training step, a dtype conversion.
    Each time the output matches the reference's: nothing derived from parameters is kept."""
    ref, fused, x = pair(name, backend)

    def check(dtype=torch.float64):
        with torch.no_grad():
            torch.testing.assert_close(fused(x.to(dtype)), ref(x.to(dtype)), rtol=1e-5, atol=1e-5)

    check()
    for module in (ref, fused):
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.data.mul_(1.25)
    check()
    for module in (ref, fused):
        with torch.no_grad():
            for t in module.state_dict().values():
                if t.is_floating_point():
                    t.mul_(0.75)
    check()
    state = randomize_bn(copy.deepcopy(ref)).state_dict()
    ref.load_state_dict(state)
    fused.load_state_dict(state)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    # Constants made in inference mode must not enter autograd's graph outside it.
    fused.requires_grad_(False)
    xr = x.detach().requires_grad_()
    fused(xr).sum().backward()
    torch.testing.assert_close(xr.grad, torch.func.grad(lambda t: ref(t).sum())(x), rtol=1e-5, atol=1e-5)
    fused.requires_grad_(True)
    check()
    for module in (ref, fused):
        module.train()
        module(x).sum().backward()
        module.eval()
    check()
    ref.float()
    fused.float()
    check(torch.float32)

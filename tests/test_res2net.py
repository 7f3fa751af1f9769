"""FusedBottle2neck and ``splat::res2net_chain`` against the independent reference Bottle2necks.

Expected gradients come from autograd through tests/reference/res2net.py, never from the op's
own backward formulas. Triton runs through its interpreter on CPU, so its shapes stay tiny.
"""

import copy
import io

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import splat
from splat.modules.res2net import FusedBottle2neck
from splat.ops.res2net_chain import res2net_chain
from tests.helpers import (
    BACKENDS, DEVICE, DTYPES, LAYOUTS, PROPERTY, backend_params, check_rejects_bad_input, compare_modules,
    as_subclass, compare_random_block, count_calls, pretend_synchronising, rand, randomize_bn, run_module,
)
from tests.reference.norms import freeze
from tests.reference.res2net import Bottle2neck, MMBottle2neck, TimmBottle2neck

NHWC = torch.channels_last


def downsample(inplanes, planes, stride):
    return nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))


# name -> (reference factory, input channels). Every stype and scale path of both originals:
# the chain ('normal'), independent branches with a strided pool ('stage'), scale 1 (no
# passthrough slot), scale 2 and 8, odd widths, timm's grouped and dilated branch convs.
CONFIGS = {
    "normal-4s": (lambda: Bottle2neck(16, 4, baseWidth=26, scale=4), 16),
    "stage-4s-s2": (lambda: Bottle2neck(8, 4, stride=2, downsample=downsample(8, 4, 2), scale=4, stype="stage"), 8),
    "stage-s1": (lambda: Bottle2neck(8, 4, downsample=downsample(8, 4, 1), baseWidth=48, scale=2, stype="stage"), 8),
    "normal-1s": (lambda: Bottle2neck(16, 4, baseWidth=48, scale=1), 16),
    "normal-8s": (lambda: Bottle2neck(16, 4, baseWidth=40, scale=8), 16),
    "timm-card-dil": (lambda: TimmBottle2neck(16, 4, cardinality=2, base_width=40, scale=3, dilation=2), 16),
    "timm-stage-card": (
        lambda: TimmBottle2neck(8, 4, stride=2, downsample=downsample(8, 4, 2), cardinality=3, base_width=16,
                                scale=4, dilation=2), 8,
    ),
    "mm-normal-dil": (lambda: MMBottle2neck(16, 4, dilation=2, scales=4, base_width=26), 16),
    "mm-stage-s2": (
        lambda: MMBottle2neck(8, 4, stride=2, downsample=downsample(8, 4, 2), scales=3, base_width=32,
                              stage_type="stage"), 8,
    ),
}

# The interpreter is slow: Triton gets every config in float64 and a few in float32.
TRITON_FLOAT32 = ("normal-4s", "timm-stage-card")


def make_pair(name, backend, dtype=torch.float64, train=True):
    factory, inplanes = CONFIGS[name]
    ref = randomize_bn(factory()).to(DEVICE, dtype).train(train)
    fused = FusedBottle2neck.from_module(copy.deepcopy(ref), backend=backend)
    return ref, fused, inplanes


def module_cases():
    cases = []
    for backend in BACKENDS:
        for dtype in DTYPES:
            for i, name in enumerate(CONFIGS):
                interpreted = backend == "triton" and DEVICE.type == "cpu"
                if interpreted and dtype == torch.float32 and name not in TRITON_FLOAT32:
                    continue
                for train in (True, False):
                    # Training-mode BN over the 18 pixels of a strided 5x6 map makes half-precision
                    # gradients hinge on ReLU masks at rounding distance from zero: low precision
                    # trains in test_matches_reference_low_precision, on 14x14 maps.
                    if train and dtype in (torch.float16, torch.bfloat16):
                        continue
                    layouts = LAYOUTS if not interpreted else [LAYOUTS[(i + train) % 2]]
                    for layout in layouts:
                        mode, fmt = "train" if train else "eval", "nhwc" if layout == NHWC else "nchw"
                        case_id = f"{backend}-{dtype}-{name}-{mode}-{fmt}"
                        cases.append(pytest.param(backend, dtype, name, train, layout, id=case_id))
    return cases


@pytest.mark.parametrize("backend, dtype, name, train, layout", module_cases())
def test_matches_reference(backend, dtype, name, train, layout):
    ref, fused, inplanes = make_pair(name, backend, dtype, train)
    ref_low = copy.deepcopy(ref) if dtype != torch.float64 else None
    compare_modules(ref, fused, rand(2, inplanes, 5, 6, dtype=dtype, layout=layout), dtype, ref_low, steps=2 if train else 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", backend_params())
def test_matches_reference_low_precision(backend, dtype, name, layout):
    ref, fused, inplanes = make_pair(name, backend, dtype)
    ref_low = copy.deepcopy(ref)
    compare_modules(ref, fused, rand(4, inplanes, 14, 14, dtype=dtype, layout=layout), dtype, ref_low)


@pytest.mark.parametrize("backend", backend_params())
def test_momentum_none_and_frozen_stats(backend):
    """Cumulative running averages (momentum=None), and BNs without running statistics."""
    ref, fused, inplanes = make_pair("normal-4s", backend)
    for module in (ref, fused):
        for bn in module.bns:
            bn.momentum = None
    compare_modules(ref, fused, rand(2, inplanes, 4, 5), torch.float64, steps=3)
    ref = Bottle2neck(16, 4, scale=3).double().eval()
    for i, bn in enumerate(ref.bns):
        ref.bns[i] = nn.BatchNorm2d(bn.num_features, track_running_stats=False).double().eval()
    fused = FusedBottle2neck.from_module(copy.deepcopy(ref), backend=backend)
    compare_modules(ref, fused, rand(2, 16, 4, 5), torch.float64)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", backend_params())
def test_frozen_batchnorm(backend, train):
    """FrozenBatchNorm2d (detection backbones) everywhere, in train mode too: the chain folds the
    frozen branch BNs into its convs as in eval mode; and frozen branches in a training block."""
    for name in ("normal-4s", "timm-stage-card"):
        factory, inplanes = CONFIGS[name]
        ref = freeze(randomize_bn(factory())).to(DEVICE, torch.float64).train(train)
        fused = FusedBottle2neck.from_module(copy.deepcopy(ref), backend=backend)
        compare_modules(ref, fused, rand(2, inplanes, 5, 6), torch.float64, steps=2)
    ref = randomize_bn(Bottle2neck(16, 4, scale=3)).double().train(train)
    ref.bns = freeze(ref.bns)
    compare_modules(ref, FusedBottle2neck.from_module(copy.deepcopy(ref), backend=backend),
                    rand(2, 16, 4, 5), torch.float64)


@pytest.mark.parametrize("synchronising", [False, True], ids=["local", "synchronising"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", backend_params())
def test_sync_batchnorm(backend, train, synchronising, monkeypatch):
    """SyncBatchNorm branch BNs: folded into the chain where they do not synchronise; where they do,
    each step's statistics span the processes, and the chain runs on the modules."""
    if synchronising:
        pretend_synchronising(monkeypatch)
    for name in ("normal-4s", "timm-stage-card"):
        factory, inplanes = CONFIGS[name]
        ref = nn.SyncBatchNorm.convert_sync_batchnorm(randomize_bn(factory())).to(DEVICE, torch.float64).train(train)
        fused = FusedBottle2neck.from_module(copy.deepcopy(ref), backend=backend)
        calls = count_calls(fused.bns, nn.SyncBatchNorm)
        compare_modules(ref, fused, rand(2, inplanes, 5, 6), torch.float64, steps=2)
        assert calls and set(calls.values()) == {2 * synchronising * train}, calls


def test_tiles_and_splits(monkeypatch):
    """Triton paths that the module tests' tiny shapes miss: several channel and reduction
    tiles with tails (width 20), several pixel tiles, and a split-K weight gradient."""
    if "triton" not in BACKENDS:
        pytest.skip("triton is unavailable")
    from splat.kernels import res2net_chain as kernels

    monkeypatch.setattr(kernels, "PIXELS_PER_SPLIT", 40)
    ref = Bottle2neck(64, 16, baseWidth=80, scale=2).double()
    fused = FusedBottle2neck.from_module(copy.deepcopy(ref), backend="triton")
    compare_modules(ref, fused, rand(2, 64, 7, 9, layout=NHWC), torch.float64)
    ref = Bottle2neck(8, 2, baseWidth=128, scale=3).float()
    fused = FusedBottle2neck.from_module(copy.deepcopy(ref), backend="triton")
    compare_modules(ref, fused, rand(3, 8, 9, 10, dtype=torch.float32), torch.float32, copy.deepcopy(ref))


def chain_args(stage, batch_stats, scale=3, width=4, groups=2, stride=1, dilation=1, layout=torch.contiguous_format,
               hw=(4, 5)):
    nums = max(1, scale - 1)
    x = rand(2, width * scale, *hw, layout=layout).relu().requires_grad_()
    weight = rand(nums * width, width // groups, 3, 3, scale=0.5, requires_grad=True)
    gamma = (rand(nums * width).abs() + 0.5).requires_grad_()
    beta = rand(nums * width, requires_grad=True)
    running = (rand(nums * width), rand(nums * width).abs() + 0.5)
    return (x, weight, gamma, beta, *running, 1e-5, scale, stage, stride, dilation, groups, batch_stats)


CHAIN_CASES = [
    pytest.param(dict(stage=False, batch_stats=True), id="normal-train"),
    pytest.param(dict(stage=False, batch_stats=False, dilation=2, layout=NHWC), id="normal-eval-dil-nhwc"),
    pytest.param(dict(stage=True, batch_stats=True, stride=2, layout=NHWC), id="stage-train-s2-nhwc"),
    pytest.param(dict(stage=True, batch_stats=False, scale=4, groups=1), id="stage-eval"),
    pytest.param(dict(stage=False, batch_stats=True, scale=1), id="scale1"),
]


@pytest.mark.parametrize("case", CHAIN_CASES)
@pytest.mark.parametrize("backend", backend_params())
def test_gradcheck(backend, case):
    args = chain_args(**case, width=2, hw=(3, 4))
    interpreted = backend == "triton" and DEVICE.type == "cpu"

    def fn(x, weight, gamma, beta):
        return res2net_chain(x, weight, gamma, beta, *args[4:], backend=backend)[0]

    assert torch.autograd.gradcheck(fn, args[:4], fast_mode=interpreted)


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    """Schema, fake kernels, autograd registration and compile tracing of both ops (the backward op
    is first-order only, so it gets inputs that do not require grad)."""
    for case in (CHAIN_CASES[0], CHAIN_CASES[2]):
        args = list(chain_args(**case.values[0]))
        torch.library.opcheck(torch.ops.splat.res2net_chain, (*args, True, backend))
        with torch.no_grad():
            out, y, mean, var = torch.ops.splat.res2net_chain(*args, True, backend)
        x, weight, gamma = (t.detach() for t in args[:3])
        dout = torch.randn(out.shape, dtype=out.dtype).contiguous(memory_format=splat._layout.memory_format(out))
        back = (dout, x, weight, gamma, out, y, mean, var, *args[6:], backend)
        torch.library.opcheck(torch.ops.splat.res2net_chain_backward, back)


@pytest.mark.parametrize("backend", backend_params())
def test_op_eval_without_saved_outputs(backend):
    """Inference (save_y=False) returns the same output as with y kept for the backward."""
    args = [t.detach() if isinstance(t, torch.Tensor) else t for t in chain_args(False, False)]
    with torch.no_grad():
        kept = res2net_chain(*args, save_y=True, backend=backend)
        lean = res2net_chain(*args, save_y=False, backend=backend)
    for a, b in zip(kept, lean):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_deterministic(backend):
    """Statistics and weight gradients go through fixed-order partials: runs agree bitwise."""
    args = chain_args(True, True, stride=2)
    results = []
    for _ in range(2):
        out, mean, var = res2net_chain(*args, backend=backend)
        grads = torch.autograd.grad(out.sum(), args[:4])
        results.append((out, mean, var, *grads))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend", backend_params(["torch"]))
def test_torch_compile_fullgraph(backend):
    _, fused, inplanes = make_pair("normal-4s", backend)
    eager = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True)
    for step in range(2):
        x = rand(2, inplanes, 5, 6, layout=LAYOUTS[step])
        out, dx, _ = run_module(compiled, x)
        grads = {n: p.grad for n, p in fused.named_parameters()}
        exp_out, exp_dx, exp_grads = run_module(eager, x)
        torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dx, exp_dx, rtol=1e-10, atol=1e-10)
        for name, g in grads.items():
            torch.testing.assert_close(g, exp_grads[name], rtol=1e-10, atol=1e-10, msg=name)
    for (name, b), (_, e) in zip(fused.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(b, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("name", ["normal-4s", "stage-4s-s2", "timm-stage-card"])
def test_state_dict_round_trip(name):
    """The constructor builds the original's keys and shapes; state_dicts load unchanged both ways."""
    factory, inplanes = CONFIGS[name]
    ref = randomize_bn(factory()).double().eval()
    if isinstance(ref, Bottle2neck):
        planes = ref.conv3.out_channels // 4
        fused = FusedBottle2neck(
            inplanes, planes, ref.convs[0].stride[0], copy.deepcopy(ref.downsample),
            baseWidth=64 * ref.width // planes, scale=ref.scale, stype=ref.stype, backend="torch",
        ).double().eval()
    else:
        fused = FusedBottle2neck.from_module(copy.deepcopy(ref), backend="torch")
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = rand(2, inplanes, 5, 6)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-10, atol=1e-10)
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    back = randomize_bn(factory()).double().eval()
    back.load_state_dict(torch.load(buffer), strict=True)
    torch.testing.assert_close(back(x), ref(x), rtol=0, atol=0)


def test_from_module_keeps_mode_device_dtype():
    ref = Bottle2neck(8, 4, scale=3).float().eval()
    fused = FusedBottle2neck.from_module(ref)
    assert not fused.training and fused.conv1.weight.dtype == torch.float32
    assert (fused.width, fused.scale, fused.stype) == (ref.width, 3, "normal")
    timm = TimmBottle2neck(8, 4, stride=2, cardinality=2, base_width=20, scale=2, dilation=3)
    fused = FusedBottle2neck.from_module(timm)
    assert (fused.width, fused.stype, fused.cardinality, fused.dilation, fused.stride) == (timm.width, "stage", 2, 3, 2)


class FixedDrop(nn.Module):
    """DropBlock / DropPath with a mask that depends only on the input's shape and ``seed``, so the
    fused block and the reference drop the same elements (``per_sample``: whole samples, as DropPath)."""

    def __init__(self, seed, per_sample):
        super().__init__()
        self.seed, self.per_sample = seed, per_sample

    def forward(self, x):
        shape = (x.shape[0], 1, 1, 1) if self.per_sample else x.shape
        g = torch.Generator(x.device).manual_seed(self.seed)
        keep = torch.rand(shape, generator=g, device=x.device) > 0.3
        return x * keep.to(x.dtype) / 0.7


@pytest.mark.parametrize("backend", backend_params())
def test_from_module_keeps_timm_drop_block_and_drop_path(backend):
    """timm's DropBlock (on the concatenated branches) and stochastic depth (on bn3's output, before
    the residual add) are carried over and run where timm runs them."""
    ref = randomize_bn(TimmBottle2neck(16, 4, base_width=40, scale=3, drop_block=lambda: FixedDrop(1, False),
                                       drop_path=FixedDrop(2, True))).to(DEVICE, torch.float64)
    fused = FusedBottle2neck.from_module(copy.deepcopy(ref), backend=backend)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    compare_modules(ref, fused, rand(4, 16, 5, 6), torch.float64, steps=2)


def test_from_module_rejects_unsupported():
    with pytest.raises(ValueError, match="se is set"):
        FusedBottle2neck.from_module(TimmBottle2neck(8, 4, attn_layer=lambda c: nn.Sigmoid()))
    with pytest.raises(ValueError, match="relu is GELU"):
        FusedBottle2neck.from_module(TimmBottle2neck(8, 4, act_layer=lambda inplace: nn.GELU()))
    with pytest.raises(ValueError, match="only torch.nn.BatchNorm2d"):
        FusedBottle2neck.from_module(TimmBottle2neck(8, 4, norm_layer=lambda c: nn.GroupNorm(1, c)))
    with pytest.raises(ValueError, match="'stage' block that does not pool its last split"):
        FusedBottle2neck.from_module(MMBottle2neck(8, 4, downsample=downsample(8, 4, 1), stage_type="stage"))
    m = MMBottle2neck(16, 4)
    m.with_plugins = True
    with pytest.raises(ValueError, match="MMBottle2neck has plugins"):
        FusedBottle2neck.from_module(m)
    m = MMBottle2neck(16, 4)
    m.norm3_name, m.norm3 = "norm3", m.bn3
    with pytest.raises(ValueError, match="MMBottle2neck.norm3: the norm must be named bn3"):
        FusedBottle2neck.from_module(m)
    m = Bottle2neck(16, 4, scale=3)
    m.conv1.stride = (2, 2)
    with pytest.raises(ValueError, match=r"conv1 has stride \(2, 2\)"):
        FusedBottle2neck.from_module(m)
    m = Bottle2neck(16, 4, scale=3)
    m.convs[0].padding = (2, 2)
    with pytest.raises(ValueError, match=r"convs.0: only square-strided 3x3 convs padded by their dilation"):
        FusedBottle2neck.from_module(m)
    m = Bottle2neck(16, 4, scale=3)
    as_subclass(m.convs[1], "StdConv2d")
    with pytest.raises(ValueError, match=r"convs.1 is .*\.StdConv2d, which may compute"):
        FusedBottle2neck.from_module(m)
    with pytest.raises(TypeError, match="Conv2d is not a Res2Net Bottle2neck"):
        FusedBottle2neck.from_module(nn.Conv2d(4, 4, 1))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch(train):
    """An empty batch gives an empty output, and BN counts it as the reference's BN does."""
    ref, fused, inplanes = make_pair("stage-4s-s2", "auto", torch.float32, train)
    x = rand(0, inplanes, 7, 7, dtype=torch.float32)
    out = fused(x)
    assert out.shape == ref(x).shape == (0, 16, 4, 4)
    for (name, b), (_, e) in zip(fused.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, e, msg=name)


@pytest.mark.parametrize("backend", backend_params())
def test_op_empty_batch(backend):
    args = [t.detach() if isinstance(t, torch.Tensor) else t for t in chain_args(True, True, stride=2)]
    args[0] = args[0][:0]
    out, mean, var = res2net_chain(*args, backend=backend)
    assert out.shape == (0, 12, 2, 3)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_output_dtype(train):
    """Under autocast the fused module returns the dtype (and about the values) the reference returns."""
    ref, fused, inplanes = make_pair("normal-4s", "auto", torch.float32, train)
    x = rand(2, inplanes, 6, 6, dtype=torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, exp = fused(x), ref(x)
    assert out.dtype == exp.dtype
    torch.testing.assert_close(out.float(), exp.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_input(backend):
    ref, fused, _ = make_pair("normal-4s", backend, train=False)
    x = rand(2, 32, 7, 9)[:, ::2, 1:, ::2]
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", backend_params())
def test_nan_propagates(backend, train):
    """A NaN pixel spreads as in the reference: over its channels' statistics in training, to the
    pixels the 3x3 convs reach in eval (a GPU max() instruction would drop it at the ReLUs)."""
    for name in ("normal-4s", "stage-4s-s2"):
        ref, fused, inplanes = make_pair(name, backend, train=train)
        x = rand(2, inplanes, 7, 6)
        x[0, :, 3, 2] = float("nan")
        out, exp = fused(x), ref(x)
        assert exp.isnan().any(), name
        assert train or not exp.isnan().all(), f"{name}: eval mode should keep the NaN local"
        torch.testing.assert_close(out.isnan(), exp.isnan(), msg=name)


def test_bad_input():
    fused = FusedBottle2neck(16, 4, backend="torch").to(DEVICE)
    check_rejects_bad_input(fused, 16)
    with pytest.raises(ValueError, match="stype must be one of"):
        FusedBottle2neck(16, 4, stype="first")
    with pytest.raises(ValueError, match="scale must be a positive int"):
        FusedBottle2neck(16, 4, scale=0)
    with pytest.raises(ValueError, match="stride > 1 needs stype='stage'"):
        FusedBottle2neck(16, 4, stride=2)
    with pytest.raises(ValueError, match="branch width of 0"):
        FusedBottle2neck(16, 1, baseWidth=26)
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedBottle2neck(16, 4, backend="fastest")
    fused.bns[1].eval()


def test_op_bad_input():
    args = [t.detach() if isinstance(t, torch.Tensor) else t for t in chain_args(False, True)]
    with pytest.raises(ValueError, match="x must be 4-D"):
        res2net_chain(args[0][0], *args[1:])
    with pytest.raises(ValueError, match="weight must have shape"):
        res2net_chain(args[0], args[1][:, :1], *args[2:])
    with pytest.raises(TypeError, match="weight dtype"):
        res2net_chain(args[0], args[1].float(), *args[2:])
    with pytest.raises(ValueError, match="scale=5 must divide"):
        res2net_chain(*args[:7], 5, *args[8:])
    with pytest.raises(ValueError, match="groups=3 must divide width"):
        res2net_chain(*args[:11], 3, args[12])
    with pytest.raises(ValueError, match="stride > 1 needs stage=True"):
        res2net_chain(*args[:9], 2, *args[10:])
    with pytest.raises(ValueError, match="gamma must have 8 elements"):
        res2net_chain(args[0], args[1], args[2][:4], *args[3:])
    with pytest.raises(TypeError, match="running_var must be torch.float64"):
        res2net_chain(*args[:5], args[5].float(), *args[6:])
    with pytest.raises(ValueError, match="backend must be one of"):
        res2net_chain(*args, backend="fast")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU-only error")
def test_cuda_backend_on_cpu_raises(monkeypatch):
    monkeypatch.delenv("SPLAT_CUDA_EMULATE", raising=False)
    with pytest.raises(RuntimeError, match="backend='cuda' got a tensor on cpu"):
        FusedBottle2neck(16, 4, backend="cuda")(rand(2, 16, 5, 5, dtype=torch.float32))


@st.composite
def res2net_blocks(draw):
    """A valid original or timm Bottle2neck: a first block of a stage (downsample, any input width,
    stride 1 or 2) or a later one (input = output width, stride 1), and an input for it."""
    timm, first = draw(st.booleans()), draw(st.booleans())
    planes, base_width = draw(st.integers(1, 3)), draw(st.sampled_from([26, 40, 64, 96]))
    assume(planes * base_width >= 64)  # at least one channel per split
    scale, stride = draw(st.integers(1, 5)), draw(st.sampled_from([1, 2])) if first else 1
    inplanes = draw(st.integers(1, 8)) if first else 4 * planes
    ds = downsample(inplanes, planes, stride) if first else None
    if timm:
        cardinality, dilation = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2]))
        block = TimmBottle2neck(inplanes, planes, stride, ds, cardinality, base_width, scale, dilation)
    else:
        block = Bottle2neck(inplanes, planes, stride, ds, base_width, scale, "stage" if first else "normal")
    train = draw(st.booleans())
    shape = (draw(st.integers(2 if train else 1, 3)), inplanes, draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    return block, shape, draw(st.sampled_from(LAYOUTS)), train


@pytest.mark.parametrize("backend", backend_params())
@PROPERTY
@given(case=res2net_blocks())
def test_property_random_blocks(backend, case):
    block, shape, layout, train = case
    compare_random_block(block, lambda m: FusedBottle2neck.from_module(m, backend=backend), shape, layout, train)

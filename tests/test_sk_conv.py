"""FusedSKConv / FusedSelectiveKernel against the independent reference SKConv / SelectiveKernel of
tests/reference/sk.py, and the grouped channel order (``groups``) of the ops they use."""

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from splat.modules.sk_conv import FusedSelectiveKernel, FusedSKConv
from splat.ops import attention_sum, radix_pool
from tests.helpers import (
    DEVICE, DTYPES, LAYOUTS, PROPERTY, assert_close, backend_params, check_rejects_bad_input, compare_modules,
    as_subclass, compare_random_block, count_calls, pretend_synchronising, rand, randomize_bn, run_module,
)
from tests.reference.norms import BatchNormAct2d, FrozenBatchNorm2d, SyncBatchNormAct, freeze
from tests.reference.sk import SelectiveKernel, SKConv

# SKConv(features, WH, M, G, r, stride, L): branches reading the whole input, grouped (the buffer
# is group-major: the ops' groups argument), ungrouped (branch-major), one branch, stride 2.
SK_CONFIGS = {
    "m2g2": dict(features=8, WH=None, M=2, G=2, r=2, L=4),
    "m3g4-s2": dict(features=8, WH=None, M=3, G=4, r=2, stride=2, L=4),
    "m2g1": dict(features=6, WH=None, M=2, G=1, r=2, L=4),
    "m1": dict(features=4, WH=None, M=1, G=2, r=2, L=4),
}

# timm-like SelectiveKernel(in, out, stride, groups, num_paths, attn_channels, split_input): dilated 3x3s.
TIMM_CONFIGS = {
    "split": dict(in_channels=8, out_channels=8, groups=2, num_paths=2, attn_channels=8, split_input=True),
    "split-s2-3paths": dict(in_channels=12, out_channels=8, stride=2, groups=4, num_paths=3, attn_channels=8,
                            split_input=True),
    "whole": dict(in_channels=8, out_channels=8, groups=2, num_paths=2, attn_channels=8, split_input=False),
}


def make_sk(name, backend, dtype=torch.float64):
    config = SK_CONFIGS[name]
    ref = randomize_bn(SKConv(**config)).to(DEVICE, dtype)
    fused = FusedSKConv(**config, backend=backend).to(DEVICE, dtype)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused, config["features"]


def make_timm(name, backend, dtype=torch.float64):
    ref = randomize_bn(SelectiveKernel(**TIMM_CONFIGS[name])).to(DEVICE, dtype)
    fused = FusedSKConv.from_module(ref, backend=backend)
    return ref, fused, TIMM_CONFIGS[name]["in_channels"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(SK_CONFIGS))
@pytest.mark.parametrize("backend", backend_params())
def test_skconv_matches_reference_float64(backend, name, layout, train):
    ref, fused, channels = make_sk(name, backend)
    ref.train(train)
    fused.train(train)
    compare_modules(ref, fused, rand(2, channels, 7, 6, layout=layout), torch.float64)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", ["split", "split-s2-3paths"])  # "whole" shares SKConv's path; see test_from_module
@pytest.mark.parametrize("backend", backend_params())
def test_selective_kernel_matches_reference_float64(backend, name, layout, train):
    ref, fused, channels = make_timm(name, backend)
    assert isinstance(fused, FusedSelectiveKernel)
    ref.train(train)
    fused.train(train)
    compare_modules(ref, fused, rand(2, channels, 7, 6, layout=layout), torch.float64)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("make,name", [(make_sk, "m3g4-s2"), (make_timm, "split")], ids=["skconv", "timm"])
@pytest.mark.parametrize("backend", backend_params())
def test_matches_reference_low_precision(backend, make, name, layout, dtype):
    ref, fused, channels = make(name, backend, dtype)
    ref_low = copy.deepcopy(ref)
    compare_modules(ref, fused, rand(4, channels, 9, 9, dtype=dtype, layout=layout), dtype, ref_low)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", backend_params())
def test_ops_grouped_channel_order(backend, layout):
    """radix_pool / attention_sum with groups=K read y (and scale, shift, attn) in (k, r, j) order."""
    B, K, R, Cg, H, W = 2, 3, 2, 4, 5, 3
    C = K * Cg
    y = rand(B, R * C, H, W, layout=layout, requires_grad=True)
    scale = (torch.rand(R * C, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_()
    shift = rand(R * C, requires_grad=True)
    attn = torch.rand(B, R * C, dtype=torch.float64, device=DEVICE).requires_grad_()
    inputs = [y, scale, shift, attn]

    def expected():
        act = torch.relu(y * scale[:, None, None] + shift[:, None, None]).view(B, K, R, Cg, H, W)
        gap = act.sum(2).mean((3, 4)).reshape(B, C)
        return gap, (act * attn.view(B, K, R, Cg, 1, 1)).sum(2).reshape(B, C, H, W)

    gap = radix_pool(y, scale, shift, R, backend, groups=K)
    out = attention_sum(y, scale, shift, attn, R, backend, groups=K)
    exp_gap, exp_out = expected()
    assert_close(gap, exp_gap, torch.float64, name="gap")
    assert_close(out, exp_out, torch.float64, name="out")
    assert out.is_contiguous(memory_format=layout)
    dgap, dout = torch.randn_like(exp_gap), torch.randn(exp_out.shape, dtype=torch.float64, device=DEVICE)
    grads = torch.autograd.grad((gap * dgap).sum() + (out * dout).sum(), inputs)
    exp_grads = torch.autograd.grad((exp_gap * dgap).sum() + (exp_out * dout).sum(), inputs)
    for i, (g, e) in enumerate(zip(grads, exp_grads)):
        assert_close(g, e, torch.float64, name=f"grad {i}")
    with pytest.raises(ValueError, match="groups=5 must divide"):
        radix_pool(y, scale, shift, R, backend, groups=5)


@pytest.mark.parametrize("backend", backend_params())
def test_training_steps_update_running_stats(backend):
    ref, fused, channels = make_sk("m2g2", backend)
    for branch in list(ref.convs) + list(fused.convs):
        branch[1].momentum = None
    for _ in range(3):
        x = rand(2, channels, 5, 5)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-10, atol=1e-10)
    ref_buffers = dict(ref.named_buffers())
    for name, b in fused.named_buffers():
        torch.testing.assert_close(b, ref_buffers[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", backend_params())
def test_tails_on_separate_ops(backend, train):
    """What splat::split_attention does not take runs on the separate ops: an attention MLP with
    another activation, branch BNs with different eps."""
    ref, _, channels = make_timm("split", backend)
    ref.attn.act = nn.SiLU()
    sk_ref, _, sk_channels = make_sk("m2g2", backend)
    sk_ref.convs[1][1].eps = 1e-3
    for m, c in ((ref, channels), (sk_ref, sk_channels)):
        m.train(train)
        compare_modules(m, FusedSKConv.from_module(m, backend=backend), rand(2, c, 5, 7), torch.float64)


def with_norm_act(m: SelectiveKernel, cls=BatchNormAct2d) -> SelectiveKernel:
    """``m`` with its paths' ReLU inside their norms (``cls``), as timm 1.0's ConvNormAct builds them."""
    for path in m.paths:
        bn = cls(path.bn.num_features).to(path.bn.running_mean)
        bn.load_state_dict(path.bn.state_dict())
        path.bn = bn
    return m


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", backend_params())
def test_norm_act_and_frozen_batchnorm(backend, train):
    """timm's BatchNormAct2d paths, and every BN frozen (FrozenBatchNorm2d; FrozenBatchNormAct2d in
    timm's paths), which normalises with its buffers in train mode too."""
    sk = SKConv(**SK_CONFIGS["m3g4-s2"])
    timm = [with_norm_act(SelectiveKernel(**TIMM_CONFIGS[name])) for name in ("split", "whole")]
    for m, frozen in ((timm[0], False), (sk, True), (timm[0], True), (timm[1], True)):
        ref = randomize_bn(copy.deepcopy(m))
        ref = (freeze(ref) if frozen else ref).to(DEVICE, torch.float64).train(train)
        fused = FusedSKConv.from_module(ref, backend=backend)
        assert fused.state_dict().keys() == ref.state_dict().keys()
        compare_modules(ref, fused, rand(2, 8, 5, 7), torch.float64, steps=2)


@pytest.mark.parametrize("synchronising", [False, True], ids=["local", "synchronising"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", backend_params())
def test_sync_batchnorm(backend, train, synchronising, monkeypatch):
    """SyncBatchNorm (timm's SyncBatchNormAct in the paths): folded where it does not synchronise;
    where it does, the branch norms run as modules (on the branch-major channels of a grouped
    buffer) and the kernels on their output, and the attention's norm on the separate ops."""
    if synchronising:
        pretend_synchronising(monkeypatch)
    sk = nn.SyncBatchNorm.convert_sync_batchnorm(randomize_bn(SKConv(**SK_CONFIGS["m3g4-s2"])))
    timm = with_norm_act(randomize_bn(SelectiveKernel(**TIMM_CONFIGS["whole"])), SyncBatchNormAct)
    timm.attn = nn.SyncBatchNorm.convert_sync_batchnorm(timm.attn)
    for ref in (sk, timm):
        ref = ref.to(DEVICE, torch.float64).train(train)
        fused = FusedSKConv.from_module(ref, backend=backend)
        calls = count_calls(fused, nn.SyncBatchNorm)
        compare_modules(ref, fused, rand(2, 8, 5, 7), torch.float64, steps=2)
        assert calls and set(calls.values()) == {2 * synchronising * train}, calls


@pytest.mark.parametrize("backend", backend_params())
def test_from_module(backend):
    originals = [SKConv(**SK_CONFIGS["m3g4-s2"]), SelectiveKernel(**TIMM_CONFIGS["whole"])]
    for m in originals:
        m = randomize_bn(m).to(DEVICE, torch.float64).train(False)
        fused = FusedSKConv.from_module(m, backend=backend)
        assert not fused.training
        assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
        x = rand(2, 8, 6, 6)
        torch.testing.assert_close(fused(x), m(x), rtol=1e-10, atol=1e-10)
        first = next(iter(m.parameters()))
        assert next(iter(fused.parameters())).data_ptr() != first.data_ptr(), "weights are copied, not shared"


def test_from_module_rejects_unsupported():
    m = SKConv(**SK_CONFIGS["m2g2"])
    m.convs[1][2] = nn.SiLU()
    with pytest.raises(ValueError, match="convs.1.2 is SiLU"):
        FusedSKConv.from_module(m)
    m = SKConv(**SK_CONFIGS["m2g2"])
    m.convs[0][1] = nn.GroupNorm(2, 8)
    with pytest.raises(ValueError, match="only torch.nn.BatchNorm2d"):
        FusedSKConv.from_module(m)
    m = SKConv(**SK_CONFIGS["m2g2"])
    m.convs[1][0].padding = (1, 1)  # a 5x5 with padding 1: not centred, a smaller output grid
    with pytest.raises(ValueError, match="not centred"):
        FusedSKConv.from_module(m)
    with pytest.raises(TypeError, match="neither an SKConv"):
        FusedSKConv.from_module(nn.Conv2d(2, 2, 1))
    m = SKConv(**SK_CONFIGS["m2g2"])
    as_subclass(m.convs[1][0], "StdConv2d")
    with pytest.raises(ValueError, match=r"branch 1 is .*\.StdConv2d, which may compute"):
        FusedSKConv.from_module(m)
    m = SKConv(**SK_CONFIGS["m2g2"])
    as_subclass(m.fcs[1], "LoRALinear")
    with pytest.raises(ValueError, match=r"fcs.1 is .*\.LoRALinear, which may compute"):
        FusedSKConv.from_module(m)
    m = SelectiveKernel(**TIMM_CONFIGS["split"])
    as_subclass(m.attn.fc_select, "StdConv2d")
    with pytest.raises(ValueError, match=r"attn.fc_select is .*\.StdConv2d, which may compute"):
        FusedSelectiveKernel.from_module(m)
    m = SelectiveKernel(**TIMM_CONFIGS["split"])
    m.paths[1].aa = nn.AvgPool2d(2)  # what timm builds for aa_layer at stride 2
    with pytest.raises(ValueError, match=r"paths.1.aa is AvgPool2d; not supported"):
        FusedSelectiveKernel.from_module(m)


def test_state_dict_keys_and_strict_round_trip():
    for name, config in SK_CONFIGS.items():
        ref, fused = SKConv(**config), FusedSKConv(**config, backend="torch")
        assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        ref.load_state_dict(fused.state_dict(), strict=True)
    fused = randomize_bn(FusedSKConv(**SK_CONFIGS["m2g2"], backend="torch")).double().eval()
    x = rand(2, 8, 5, 5)
    clone = pickle.loads(pickle.dumps(fused))
    torch.testing.assert_close(clone(x), fused(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    fresh = FusedSKConv(**SK_CONFIGS["m2g2"], backend="torch").double().eval()
    fresh.load_state_dict(torch.load(buffer), strict=True)
    torch.testing.assert_close(fresh(x), fused(x), rtol=0, atol=0)
    timm_ref, timm_fused, _ = make_timm("split", "torch")
    timm_ref.load_state_dict(timm_fused.state_dict(), strict=True)
    timm_fused.load_state_dict(timm_ref.state_dict(), strict=True)


def test_constructor_matches_timm_keys():
    fused = FusedSelectiveKernel(8, 8, groups=2, rd_channels=8)
    ref = SelectiveKernel(**TIMM_CONFIGS["split"])
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_constructor_takes_frozen_norm_layer():
    """norm_layer=torchvision's FrozenBatchNorm2d, which takes no device or dtype: timm's keys and numbers."""
    ref = freeze(randomize_bn(SelectiveKernel(**TIMM_CONFIGS["split"]))).double()
    fused = FusedSelectiveKernel(8, 8, groups=2, rd_channels=8, norm_layer=FrozenBatchNorm2d, backend="torch").double()
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = rand(2, 8, 5, 5)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make,name", [(make_sk, "m2g2"), (make_timm, "split")], ids=["skconv", "timm"])
def test_torch_compile_fullgraph(make, name):
    _, fused, channels = make(name, "torch")
    eager = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True)
    for step in range(2):
        x = rand(2, channels, 6, 6, layout=LAYOUTS[step])
        out, dx, grads = run_module(compiled, x)
        exp_out, exp_dx, exp_grads = run_module(eager, x)
        torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dx, exp_dx, rtol=1e-10, atol=1e-10)
        for n, g in grads.items():
            torch.testing.assert_close(g, exp_grads[n.removeprefix("_orig_mod.")], rtol=1e-10, atol=1e-10, msg=n)


@pytest.mark.gpu
@pytest.mark.parametrize("make,name", [(make_sk, "m2g2"), (make_timm, "split")], ids=["skconv", "timm"])
def test_autocast_output_dtype(make, name):
    ref, fused, channels = make(name, "auto", torch.float32)
    x = rand(2, channels, 6, 6, dtype=torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, exp = fused(x), ref(x)
    assert out.dtype == exp.dtype
    torch.testing.assert_close(out.float(), exp.float(), rtol=5e-2, atol=5e-2)


def test_empty_batch():
    _, fused, channels = make_sk("m3g4-s2", "auto", torch.float32)
    for layout in LAYOUTS:
        out = fused(rand(0, channels, 7, 7, dtype=torch.float32, layout=layout))
        assert out.shape == (0, 8, 4, 4)
    assert int(fused.convs[0][1].num_batches_tracked) == 0


def test_bad_input():
    _, fused, _ = make_sk("m2g2", "auto", torch.float32)
    check_rejects_bad_input(fused, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedSKConv(8, None, 2, 2, 2, backend="fastest")
    with pytest.raises(ValueError, match="G=3 must divide features=8"):
        FusedSKConv(8, None, 2, 3, 2)
    with pytest.raises(ValueError, match="M must be a positive int"):
        FusedSKConv(8, None, 0, 1, 2)
    with pytest.raises(ValueError, match="split_input needs in_channels=9"):
        FusedSelectiveKernel(9, 8)


@st.composite
def sk_blocks(draw):
    """A valid SKConv or timm-like SelectiveKernel, and an input for it."""
    groups, paths = draw(st.sampled_from([1, 2, 4])), draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 2]))
    if draw(st.booleans()):
        features = groups * draw(st.integers(1, 3))
        r, L = draw(st.integers(1, 4)), draw(st.integers(1, 6))
        block = SKConv(features, None, paths, groups, r, stride, L)
        channels = features
    else:
        split = draw(st.booleans())
        channels = (paths if split else 1) * groups * draw(st.integers(1, 2))
        out_channels = groups * draw(st.integers(1, 3))
        block = SelectiveKernel(channels, out_channels, stride, groups, paths, draw(st.integers(1, 8)), split)
    train = draw(st.booleans())
    shape = (draw(st.integers(2 if train else 1, 3)), channels, draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    return block, shape, draw(st.sampled_from(LAYOUTS)), train


@pytest.mark.parametrize("backend", backend_params())
@PROPERTY
@given(case=sk_blocks())
def test_property_random_blocks(backend, case):
    block, shape, layout, train = case
    compare_random_block(block, lambda m: FusedSKConv.from_module(m, backend=backend), shape, layout, train)

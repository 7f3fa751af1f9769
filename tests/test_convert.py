"""splat.convert on small models built from the reference blocks, and on timm's models where timm is installed."""

import copy
import logging
from collections import Counter

import pytest
import torch
from torch import nn

from splat.convert import ConversionReport, convert
from tests.helpers import (
    CUDA_GRAPH_WARMUP, DEVICE, LAYOUTS, as_subclass, backend_params, cuda_graph_step, rand, randomize_bn,
)
from tests.reference import res2net as ref_res2net
from tests.reference.norms import freeze, naive_sync
from tests.reference.sk import SelectiveKernel, SKConv
from tests.reference.splat import SplAtConv2d, SplitAttentionConv2d, SplitAttn


class Bottle2neck(ref_res2net.TimmBottle2neck):
    """A user's own copy of timm's Bottle2neck: same class name, defined here."""


class SplitAttnLike(nn.Module):
    """Same attributes as SplitAttn, another name: must be left alone."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2, self.radix = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1), 2

    def forward(self, x):
        return self.conv(x) * torch.sigmoid(self.fc2(self.fc1(x.mean((2, 3), keepdim=True))))


def small_net():
    """A ResNet-ish stack mixing every recognised block with modules convert must not touch."""
    blocks = [
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        SplAtConv2d(16, 16, 3, padding=1, bias=False, radix=2, norm_layer=nn.BatchNorm2d),
        nn.Sequential(SplitAttn(16, 16, groups=2, radix=4, rd_channels=16, norm_layer=nn.BatchNorm2d)),
        SKConv(16, None, 2, 4, 2, L=8),
        SelectiveKernel(16, 16, groups=4, attn_channels=8, split_input=True),
        SelectiveKernel(16, 16, groups=2, attn_channels=8, split_input=False),
        ref_res2net.Bottle2neck(16, 4, baseWidth=32, scale=4, stype="normal"),
        Bottle2neck(16, 4, base_width=32, scale=2),
        as_subclass(ref_res2net.MMBottle2neck(16, 4, dilation=2, scales=3, base_width=32), "Bottle2neck"),
        SplitAttentionConv2d(16, 16, 3, padding=1, groups=2, radix=2),
        SplitAttnLike(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ]
    return randomize_bn(nn.Sequential(*blocks))


EXPECTED = {"SplAtConv2d": 1, "SplitAttn": 1, "SplitAttentionConv2d": 1, "SKConv": 1, "SelectiveKernel": 2,
            "Bottle2neck": 3}


def run(model, x, grad=None):
    """Forward and backward on a leaf copy of x, with ``grad`` (a fixed random one by default)."""
    x = x.detach().requires_grad_()
    out = model(x)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(1), device=out.device,
                           dtype=out.dtype)
    out.backward(grad)
    return out, x.grad, {n: p.grad for n, p in model.named_parameters()}


NORMS = {"bn": lambda m: m, "frozen-bn": freeze, "sync-bn": nn.SyncBatchNorm.convert_sync_batchnorm,
         "naive-sync-bn": naive_sync}


@pytest.mark.parametrize("norms", list(NORMS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_small_net_matches_unconverted(layout, train, norms):
    """Every block converted, also with every BatchNorm2d frozen (a detection backbone) or
    synchronised (torch's SyncBatchNorm or detectron2's NaiveSyncBatchNorm, for multi-process
    training; here one process, where each is a BatchNorm2d)."""
    model = NORMS[norms](small_net()).to(DEVICE, torch.float64).train(train)
    if layout == torch.channels_last:
        model = model.to(memory_format=torch.channels_last)
    original = copy.deepcopy(model)
    converted = convert(model, backend="torch")
    assert converted is model
    report = converted.splat_conversion
    assert dict(report.converted) == EXPECTED
    assert type(model[4][0]).__name__ == "FusedSplAtConv2d"
    assert type(model[-4]) is SplitAttnLike, "a different class name is left alone"
    assert model.training == train and all(m.training == train for m in model.modules())
    assert model.state_dict().keys() == original.state_dict().keys()
    exp_params = dict(original.named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64 and p.device.type == DEVICE.type, name
        assert p.is_contiguous(memory_format=layout) == exp_params[name].is_contiguous(memory_format=layout), name
    x = rand(2, 3, 8, 8, layout=layout)
    out, dx, grads = run(model, x)
    exp_out, exp_dx, exp_grads = run(original, x)
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, exp_dx, rtol=1e-10, atol=1e-10)
    assert grads.keys() == exp_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, exp_grads[name], rtol=1e-10, atol=1e-10, msg=name)
    exp_buffers = dict(original.named_buffers())
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, exp_buffers[name], rtol=1e-10, atol=1e-10, msg=name)


def test_trains_like_the_original():
    """A few SGD steps on the converted model follow the unconverted one."""
    model = small_net().double()
    original = copy.deepcopy(model)
    convert(model, backend="torch")
    assert_trains_alike(model, original, (4, 3, 6, 6), steps=3)


def assert_trains_alike(model, original, shape, steps):
    """SGD steps with momentum on ``model`` and on ``original``, inputs of ``shape``, leave the same
    parameters."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, original)]
    for _ in range(steps):
        x = rand(*shape)
        for m, opt in zip((model, original), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9, msg=name)


class Bottle2neckLike(nn.Module):
    """A Bottle2neck's attributes but none of the three kinds (named Bottle2neck where used): must be
    left alone, the SplitAttn inside it too (a skipped block is left whole)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv3 = SplitAttn(16, 16), nn.Conv2d(16, 16, 1)
        self.convs, self.bns = nn.ModuleList(), nn.ModuleList()

    def forward(self, x):
        return self.conv3(self.conv1(x))


def test_unsupported_blocks_are_skipped_with_a_reason(caplog):
    model = nn.Sequential(
        SplitAttn(16, 16, act_layer=nn.SiLU),
        SplitAttn(16, 16, norm_layer=nn.BatchNorm2d),
        SplAtConv2d(16, 16, 3, padding=1, norm_layer=nn.BatchNorm2d),
        as_subclass(Bottle2neckLike(), "Bottle2neck"),
    )
    model[2].bn0 = nn.GroupNorm(4, 32)
    with caplog.at_level(logging.INFO, logger="splat"):
        convert(model)
    report = model.splat_conversion
    assert isinstance(report, ConversionReport)
    assert dict(report.converted) == {"SplitAttn": 1}
    skipped = [(name, cls) for name, cls, _ in report.skipped]
    assert skipped == [("0", "SplitAttn"), ("2", "SplAtConv2d"), ("3", "Bottle2neck")]
    assert "SiLU" in report.skipped[0][2] and "BatchNorm2d" in report.skipped[1][2]
    assert "not a Res2Net Bottle2neck" in report.skipped[2][2]
    assert type(model[0]).__name__ == "SplitAttn" and type(model[2]).__name__ == "SplAtConv2d"
    assert type(model[3].conv1).__name__ == "SplitAttn"
    assert "replaced SplitAttn x1" in caplog.text and "left 3 unchanged" in caplog.text


def test_blocks_with_hooks_or_parametrizations_are_skipped():
    """A hook inside a block, on the block, or a parametrized weight would silently stop running in
    the fused module: such blocks are left alone and still run them."""
    model = small_net().to(DEVICE, torch.float64)
    seen = []
    model[3].fc2.register_forward_hook(lambda m, i, o: seen.append("fc2"))
    model[5].register_forward_pre_hook(lambda m, i: seen.append("sk"))
    model[9].convs[0].register_full_backward_hook(lambda m, gi, go: seen.append("branch conv backward"))
    torch.nn.utils.parametrizations.weight_norm(model[8].conv3)
    original = copy.deepcopy(model)
    convert(model)
    report = model.splat_conversion
    assert dict(report.converted) == {"SplitAttn": 1, "SplitAttentionConv2d": 1, "SelectiveKernel": 2, "Bottle2neck": 1}
    reasons = {name: why for name, _, why in report.skipped}
    assert reasons.keys() == {"3", "5", "8", "9"}
    assert "SplAtConv2d.fc2 has forward or backward hooks" in reasons["3"]
    assert reasons["5"].startswith("SKConv has forward or backward hooks")
    assert "Bottle2neck.conv3 has parametrized tensors" in reasons["8"]
    assert "Bottle2neck.convs.0 has forward or backward hooks" in reasons["9"]
    x = rand(2, 3, 8, 8)
    out, dx, _ = run(model, x)
    assert seen == ["fc2", "sk", "branch conv backward"]
    exp_out, exp_dx, _ = run(original, x)
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, exp_dx, rtol=1e-10, atol=1e-10)


def test_top_level_block_and_errors():
    block = randomize_bn(SKConv(8, None, 2, 2, 2, L=4)).double().eval()
    fused = convert(copy.deepcopy(block), backend="torch")
    assert type(fused).__name__ == "FusedSKConv"
    assert dict(fused.splat_conversion.converted) == {"SKConv": 1}
    x = rand(2, 8, 5, 5)
    torch.testing.assert_close(fused(x), block(x), rtol=1e-10, atol=1e-10)
    plain = nn.Sequential(nn.Conv2d(3, 3, 1))
    assert convert(plain) is plain and not plain.splat_conversion.converted
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        convert("resnest50d")
    with pytest.raises(ValueError, match="backend must be one of"):
        convert(plain, backend="fastest")
    with pytest.raises(TypeError, match=r"0 is wrapped \(OptimizedModule\): call splat.convert on the model before"):
        convert(nn.Sequential(torch.compile(block)))


def test_shared_block_becomes_one_fused_module():
    """One block in three places (twice in one parent, once in another) becomes one fused module in
    all three, so its weights stay shared: SGD steps follow the unconverted model's."""
    block = randomize_bn(SplAtConv2d(8, 8, 3, padding=1, bias=False, radix=2, norm_layer=nn.BatchNorm2d))
    model = nn.Sequential(block, nn.ReLU(), block, nn.Sequential(block)).double()
    original = copy.deepcopy(model)
    convert(model, backend="torch")
    assert dict(model.splat_conversion.converted) == {"SplAtConv2d": 1}
    assert type(model[0]).__name__ == "FusedSplAtConv2d" and model[0] is model[2] is model[3][0]
    assert_trains_alike(model, original, (2, 8, 5, 5), steps=2)


def test_blocks_with_tied_weights_are_skipped():
    """A weight tied between two blocks, between a block and a module outside, or between two
    modules of one block would be untied by the fused copies: those blocks are left alone."""
    model = nn.Sequential(*(SplitAttn(8, 8, norm_layer=nn.BatchNorm2d) for _ in range(5)), nn.Conv2d(8, 8, 1))
    model[1].fc1 = model[0].fc1
    model[-1].weight = model[2].fc2.weight
    model[3].bn0.running_var = model[3].bn0.running_mean
    convert(model, backend="torch")
    assert dict(model.splat_conversion.converted) == {"SplitAttn": 1}
    reasons = {name: why for name, _, why in model.splat_conversion.skipped}
    assert reasons.keys() == {"0", "1", "2", "3"}
    assert reasons["0"].startswith("SplitAttn.fc1.weight is tied to another parameter or buffer")
    assert reasons["2"].startswith("SplitAttn.fc2.weight is tied")
    assert reasons["3"].startswith("SplitAttn.bn0.running_mean is tied")
    assert type(model[4]).__name__ == "FusedSplAtConv2d"


def test_frozen_parameters_stay_frozen():
    model = nn.Sequential(SplitAttn(16, 16, norm_layer=nn.BatchNorm2d))
    model[0].conv.weight.requires_grad_(False)
    convert(model)
    assert not model[0].conv.weight.requires_grad and model[0].fc1.weight.requires_grad


def test_compile_fullgraph_after_convert():
    model = nn.Sequential(
        SplitAttn(8, 8, norm_layer=nn.BatchNorm2d), SKConv(8, None, 2, 2, 2, L=4),
        SelectiveKernel(8, 8, groups=2, attn_channels=8),
    ).double()
    convert(model, backend="torch")
    eager = copy.deepcopy(model)
    # aot_eager: traces forward and backward through dynamo and AOTAutograd (what composes or breaks)
    # without inductor's C++ build on CPU; test_sk_conv compiles the fused modules with inductor.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = rand(2, 8, 6, 6)
    out, dx, _ = run(compiled, x)
    exp_out, exp_dx, _ = run(eager, x)
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, exp_dx, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_dynamic_shapes_after_convert(train):
    """torch.compile(dynamic=True) of the converted small net: one graph serves other batch and map
    sizes (no recompilation, as a detector's varying image sizes need), with the unconverted
    model's outputs and input gradients."""
    model = small_net().double().train(train)
    eager = copy.deepcopy(model)
    convert(model, backend="torch")
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    for i, shape in enumerate([(2, 3, 8, 10), (3, 3, 12, 11), (4, 3, 7, 9)]):  # H != W: no duck sizing
        x = rand(*shape)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            out, dx, _ = run(compiled, x)
        exp_out, exp_dx, _ = run(eager, x)
        torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dx, exp_dx, rtol=1e-10, atol=1e-10)


# TorchScript is deprecated from torch 2.13 on, but users of torch 2.11 and 2.12 may still serve
# with it. splat's shape checks warn that a trace takes their outcome as a constant.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit.*", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", backend_params())
def test_export_and_trace_for_inference(backend, tmp_path):
    """A converted model, in eval mode, through torch.export and torch.jit.trace (under no_grad, as
    for inference): both record splat's ops, survive a save and a load, and compute what the
    unconverted model does, on a batch of another size than the traced one."""
    model = small_net().to(DEVICE, torch.float64).eval()
    original = copy.deepcopy(model)
    convert(model, backend=backend)
    x, other = rand(2, 3, 8, 8), rand(3, 3, 8, 8)
    with torch.no_grad():
        expected = original(other)
        exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(exported, tmp_path / "model.pt2")
        traced = torch.jit.trace(model, (x,))  # checks that a second trace records the same graph
        torch.jit.save(traced, tmp_path / "model.ts")
        ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert {"splat.split_attention.default", "splat.res2net_chain.default"} <= ops, ops
        assert "splat::split_attention" in str(traced.inlined_graph)
        for loaded in (torch.export.load(tmp_path / "model.pt2").module(), torch.jit.load(tmp_path / "model.ts")):
            torch.testing.assert_close(loaded(other), expected, rtol=1e-10, atol=1e-10)


def _ddp_rank(rank, world, init_file, backend, norms):
    """One rank of test_distributed_data_parallel."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _ddp_step(rank, world, backend, norms)  # a failure ends this process, and spawn stops the others
    # Every rank done, and its DDP objects freed, before the group goes: else a rank can hang.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _ddp_step(rank, world, backend, norms):
    """On DEVICE, each rank its own batch: the DDP gradients must be those of the unconverted model
    (with BatchNorm2d, the mean over ranks of each rank's own; with NaiveSyncBatchNorm, whose
    statistics span the ranks, those of the unconverted model under DDP, as are the outputs and
    running statistics), and an SGD step must leave the ranks equal."""
    torch.manual_seed(0)  # the same initial model on every rank
    original = NORMS[norms](small_net()).to(DEVICE, torch.float64)
    model = convert(copy.deepcopy(original), backend=backend)
    assert dict(model.splat_conversion.converted) == EXPECTED
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batches = [torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(r)).to(DEVICE)
               for r in range(world)]
    out = ddp(batches[rank])
    out.square().mean().backward()
    if norms == "bn":
        expected = {name: torch.zeros_like(p) for name, p in original.named_parameters()}
        for batch in batches:
            local = copy.deepcopy(original)  # each rank's BNs see only that rank's batch
            local(batch).square().mean().backward()
            for name, p in local.named_parameters():
                expected[name] += p.grad / world
    else:
        reference = torch.nn.parallel.DistributedDataParallel(original)
        exp_out = reference(batches[rank])
        exp_out.square().mean().backward()
        torch.testing.assert_close(out, exp_out, rtol=1e-9, atol=1e-12, msg=f"rank {rank}: output")
        expected = {name: p.grad for name, p in original.named_parameters()}
        exp_buffers = dict(original.named_buffers())
        for name, b in model.named_buffers():
            torch.testing.assert_close(b, exp_buffers[name], rtol=1e-9, atol=1e-12, msg=f"rank {rank}: {name}")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=f"rank {rank}: {name}")
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    first = weights.clone()
    torch.distributed.broadcast(first, src=0)  # gloo broadcasts CUDA tensors too, not all_gather
    assert torch.equal(weights, first), f"rank {rank}: weights differ from rank 0's after a step"


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("norms", ["bn", "naive-sync-bn"])
@pytest.mark.parametrize("backend", backend_params())
def test_distributed_data_parallel(backend, norms, tmp_path):
    """The converted model under DistributedDataParallel: two processes over gloo (on one GPU, both
    ranks share it). With NaiveSyncBatchNorm the blocks run their norms as modules, which
    synchronise the statistics over the ranks, a path one process never takes."""
    torch.multiprocessing.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), backend, norms), nprocs=2)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_wrapped_models_are_refused(tmp_path):
    """convert refuses a DDP or FSDP model, or one that holds one (in a process group of one): the
    wrapper would keep the old parameters. FSDP's first version needs a GPU."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(small_net().to(DEVICE))
        wrapped = [ddp, nn.Sequential(nn.ReLU(), ddp), fully_shard(small_net().to(DEVICE))]
        if DEVICE.type == "cuda":
            wrapped.append(FullyShardedDataParallel(small_net().to(DEVICE)))
        for model in wrapped:
            with pytest.raises(TypeError, match="call splat.convert on the model before wrapping it"):
                convert(model)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params())
def test_cuda_graph_training_step(backend):
    """A converted model's training step (forward and backward, every block type) captured in a
    CUDA graph and replayed on a new input: output, gradients and BN running statistics follow the
    unconverted model's eager steps. float64: no TF32 convolutions, so the tolerances stay tight."""
    original = small_net().to("cuda", torch.float64)
    model = convert(copy.deepcopy(original), backend=backend)
    x = torch.randn(4, 3, 8, 8, device="cuda", dtype=torch.float64, requires_grad=True)
    replay = cuda_graph_step(model, x)
    for _ in range(CUDA_GRAPH_WARMUP):  # the same steps: the same running statistics
        original(x.detach()).sum().backward()
    x_new = torch.randn_like(x)
    out = replay(x_new)
    original.zero_grad(set_to_none=True)
    exp_out, exp_dx, exp_grads = run(original, x_new, grad=torch.ones(out.shape, device="cuda", dtype=out.dtype))
    torch.testing.assert_close(out, exp_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x.grad, exp_dx, rtol=1e-9, atol=1e-9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, exp_grads[name], rtol=1e-9, atol=1e-9, msg=name)
    exp_buffers = dict(original.named_buffers())
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, exp_buffers[name], rtol=1e-9, atol=1e-9, msg=name)


TIMM_MODELS = ["resnest14d", "resnest50d_4s2x40d", "res2net50_26w_4s", "skresnext50_32x4d", "skresnet18"]
TIMM_BLOCKS = ("SplitAttn", "Bottle2neck", "SelectiveKernel")


def timm_model(name, **kwargs):
    timm = pytest.importorskip("timm")
    return randomize_bn(timm.create_model(name, pretrained=False, num_classes=10, **kwargs))


def assert_close_to_scale(actual, expected, name, rtol=1e-9):
    """|actual - expected| within rtol of expected's largest magnitude: over ~50 layers rounding
    differences are amplified elementwise, but stay small against the tensor's scale."""
    err = (actual - expected).abs().max().item()
    assert err <= rtol * expected.abs().max().item(), f"{name}: max error {err:.3g}"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models(name, train):
    """Every block of timm's model is converted (timm's own classes, as timm builds them, with
    stochastic depth), and the converted model computes, in float64, the outputs, gradients and
    running statistics of the original, on both layouts."""
    check_converted_timm_model(timm_model(name, drop_path_rate=0.2), train)


@pytest.mark.parametrize("norms", ["freeze_batch_norm_2d", "convert_sync_batchnorm"])
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_other_batchnorms(name, norms):
    """As test_timm_models, training, with every BN replaced by timm: frozen (torchvision's
    FrozenBatchNorm2d, timm's FrozenBatchNormAct2d), as in a detection backbone, or synchronised
    (SyncBatchNorm, timm's SyncBatchNormAct; one process here, where it does not synchronise)."""
    timm = pytest.importorskip("timm")
    check_converted_timm_model(getattr(timm.layers, norms)(timm_model(name)), True)


def check_converted_timm_model(model, train):
    model = model.to(DEVICE, torch.float64).train(train)
    original = copy.deepcopy(model)
    blocks = Counter(type(m).__name__ for m in model.modules() if type(m).__name__ in TIMM_BLOCKS)
    convert(model)
    assert model.splat_conversion.converted == blocks and not model.splat_conversion.skipped, model.splat_conversion
    assert model.state_dict().keys() == original.state_dict().keys()
    # 128x128 at batch 4: stage 4's BN sees 64 values a channel; on 2x2 maps at batch 2 training-mode
    # BN is so ill-conditioned that float64 rounding alone moves gradients by 1e-6.
    x = rand(4, 3, 128, 128)
    for layout in LAYOUTS:
        model.zero_grad(set_to_none=True)
        original.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same paths dropped in both
        out, dx, grads = run(model, x.contiguous(memory_format=layout))
        torch.manual_seed(1)
        exp_out, exp_dx, exp_grads = run(original, x.contiguous(memory_format=layout))
        assert_close_to_scale(out, exp_out, "output")
        assert_close_to_scale(dx, exp_dx, "input gradient")
        for n, g in grads.items():
            if train and n.endswith("fc1.bias"):
                continue  # BN follows fc1: its bias gradient is zero up to rounding
            assert_close_to_scale(g, exp_grads[n], n)
    exp_buffers = dict(original.named_buffers())
    for n, b in model.named_buffers():
        if b.is_floating_point():
            assert_close_to_scale(b, exp_buffers[n], n)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_train_compiled_bf16(name):
    model = convert(timm_model(name).cuda()).to(memory_format=torch.channels_last).train()
    assert not model.splat_conversion.skipped, model.splat_conversion
    x = torch.randn(4, 3, 96, 96, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = torch.compile(model)(x)
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

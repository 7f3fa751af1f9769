"""The benchmark scripts without a GPU. bench_blocks.py: the README's main command, the op cases the
GPU run times (called here on the torch backend, which takes the kernels' arguments), and the
report with the fields only a GPU run records. bench_host.py: runs every block with its kernels
faked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_blocks  # noqa: E402


def cpu_bench(argv=()):
    args = bench_blocks.parse_args(["--quick", "--batch", "2", *argv])
    device = torch.device("cpu")
    return bench_blocks.Bench(args, device, bench_blocks.Timer(device, 1.0, 1.0), bench_blocks.Budget(None))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, benchmarks/gpu_check.sh runs the full benchmark")
def test_quick_run(tmp_path):
    """Every family's fused torch backend agrees with eager (else it is reported NOT TIMED) and
    the results are written."""
    assert bench_blocks.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "blocks-cpu.json").read_text())
    assert not [s for s in doc["skipped"] if "NOT TIMED" in s["reason"]], doc["skipped"]
    impls = {(r["block"], r["impl"]) for r in doc["records"]}
    for block in ("splat", "res2net", "sk"):
        assert {(block, "eager"), (block, f"{block}-torch"), (block, "conv")} <= impls
    assert {("sk", "conv-fused"), ("sk", "conv-cat")} <= impls
    # Convolutions alone are baselines: no speedup column of their own.
    assert not {"conv-fused", "conv-cat"} & set(bench_blocks.geomean_table(doc["records"])[0])
    assert (tmp_path / "blocks-cpu.md").read_text().startswith("# Block benchmark")


def test_plan_order():
    """The full plan: every (config, dtype, layout) once; the primary models in the first dtype and
    layout first, stage by stage across the families; the other models last."""
    bench = cpu_bench(["--dtypes", "bfloat16,float32"])
    bench.args.quick = False
    families = [bench_blocks.FAMILIES[name] for name in ("splat", "res2net", "sk")]
    groups = bench.plan(families)
    jobs = [(fam.name, cfg.name, dname, lname) for group in groups for fam, cfg, dname, lname in group]
    assert len(jobs) == len(set(jobs)) == sum(len(f.configs) for f in families) * 2 * 2
    assert len(groups) == 8
    first = [(fam.name, cfg.name, dname, lname) for fam, cfg, dname, lname in groups[0]]
    assert first[:3] == [("splat", "resnest50d.s1", "bfloat16", "nchw"), ("res2net", "res2net50_26w_4s.s1", "bfloat16", "nchw"),
                         ("sk", "skresnext50_32x4d.s1", "bfloat16", "nchw")]
    assert first[-1] == ("sk", "skresnext50_32x4d.s4", "bfloat16", "nchw")
    assert {(d, lo) for _, _, d, lo in first} == {("bfloat16", "nchw")}
    primary = [cfg.primary for group in groups for _, cfg, _, _ in group]
    assert primary == sorted(primary, reverse=True)


def test_prewarm_runs(tmp_path):
    """--prewarm runs every job of the plan (on CPU: the torch backend, its op cases) and writes nothing."""
    bench = cpu_bench()
    families = list(bench_blocks.FAMILIES.values())
    for jobs in bench.plan(families):
        bench.prewarm(jobs, ["torch"], ["torch"])
    assert not bench.skipped and not bench.records
    assert bench_blocks.main(["--prewarm", "--out", str(tmp_path)]) == 0
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_op_cases_run(dtype, layout):
    bench = cpu_bench()
    cfg = next(c for c in bench_blocks.FAMILIES["splat"].configs if c.quick)
    cases = bench.op_cases(cfg, dtype, layout, "torch")
    assert {(op, direction) for op, direction, *_ in cases} >= {
        ("split_attention", "fwd+bwd"), ("split_attention", "bwd-sums"), ("split_attention", "bwd-dy")}
    for op, direction, _, fn, inputs, *_ in cases:
        outs = fn(*inputs)
        for out in outs if isinstance(outs, (tuple, list)) else (outs,):
            assert torch.isfinite(out).all(), (op, direction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_float64_arbiter(dtype):
    """An implementation that disagrees with eager passes only if it is near float64 where eager is
    not (eager's ReLU mask flipped), and float64 is computed only on disagreement."""
    bench = cpu_bench()
    torch.manual_seed(0)
    out64, dx64 = torch.randn(4, 8, 5, 5, dtype=torch.float64), torch.randn(4, 8, 5, 5, dtype=torch.float64)
    calls = []

    def exact():
        calls.append(1)
        return out64, dx64

    out = out64.to(dtype)
    dx = (dx64 * (1 + 1e-4 * torch.randn_like(dx64))).float()
    off = dx.clone()
    off[0, :, 1:4, 1:4] += 0.3 * dx64.abs().max().item()  # a whole 3x3 footprint moved, as by a mask flip
    assert bench.check(out, dx, out, dx, dtype, exact) is None and not calls
    assert bench.check(out, dx, out, off, dtype, exact) is None and calls
    reason = bench.check(out, off, out, dx, dtype, exact)
    assert reason is not None and "from float64" in reason
    assert bench.check(out, off, out, off.clone(), dtype, exact) is None
    assert "shape" in bench.check(out[:, :4], dx, out, dx, dtype, exact)


def test_report_with_gpu_fields(tmp_path, capsys):
    """host_ms, compile and op records (a GPU run's) reach the printed and the markdown report."""
    bench = cpu_bench()
    bench.copy_gbs = 3000.0
    for impl, ms, host in (("eager", 2.0, 1.0), ("compile", 1.5, 0.2), ("splat-triton", 1.0, 1.6), ("conv", 0.5, 0.1)):
        bench.record(bench_blocks.FAMILIES["splat"], bench_blocks.FAMILIES["splat"].configs[0], "bfloat16",
                     "channels_last", "fwd+bwd", impl, ms, host_ms=host)
    bench.ops.append({"op": "split_attention", "pass": "fwd+bwd", "config": "resnest50d.s1", "dtype": "bfloat16",
                      "layout": "channels_last", "shape_class": "bfloat16/channels_last/hw>1024",
                      "backend": "triton", "us": 80.0, "min_bytes": 3.4e8, "gbs": 2500.0, "pct_copy": 83.3,
                      "graph": True})
    bench_blocks.print_report(bench, cuda=True)
    printed = capsys.readouterr().out
    meta = {"device": "test GPU", "torch": torch.__version__, "triton": "-", "date": "-", "gpu_timed": True}
    bench_blocks.write_markdown(tmp_path / "report.md", meta, bench)
    markdown = (tmp_path / "report.md").read_text()
    for text in (printed, markdown):
        assert "Host time to issue one step" in text
        assert "1.600 (1.60)" in text  # splat-triton: host 1.6 ms over device 1.0 ms
        assert "2.00x" in text  # splat-triton's speedup over eager


def test_bench_host_runs(tmp_path):
    """In a process of its own: it replaces splat's kernel calls by their fakes."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_host.py"
    out = tmp_path / "host.json"
    subprocess.run([sys.executable, str(script), "--rounds", "1", "--calls", "1", "--json", str(out)], check=True,
                   capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["block"] for r in rows] == ["splat", "splat-r4g2", "sk", "timm-sk", "res2net"]
    assert all(v > 0 for r in rows for k, v in r.items() if k.endswith("_us"))

#!/usr/bin/env python3
"""End-to-end images per second of timm's split-attention models, with and without ``splat.convert``.

Models: resnest50d, resnest50d_4s2x40d, res2net50_26w_4s, skresnext50_32x4d, and resnet50 as the
baseline (what a plain ResNet-50 costs, so the price of split attention shows with and without
splat). For each model, layout (NCHW, channels_last), mode and implementation:

- mode ``train``: forward, cross-entropy backward and an SGD (momentum) step, batch 128;
  ``infer``: eval-mode forward under ``torch.no_grad``, batch 256; both under
  ``torch.autocast("cuda", torch.bfloat16)`` over float32 parameters, 224x224 inputs;
- impl ``eager``, ``eager+convert`` (``splat.convert(model)``), ``compile``
  (``torch.compile(model)``), ``compile+convert``; resnet50 has nothing to convert, so only
  ``eager`` and ``compile``.

Reported: images/s (CUDA events over ``--iters`` steps after ``--warmup`` steps) and peak GPU
memory (``torch.cuda.max_memory_allocated`` during the timed steps). Compilation is slow, so
work is ordered to lose the least under ``--time-budget`` (default 220 s): every eager row
first, then the compiled rows model by model; whatever does not fit is listed under "skipped".

Outputs in ``--out`` (default benchmarks/results/): ``models-<device>.json``
``{"device", "torch", "triton", "date", "settings", "records": [{"model", "layout", "mode", "impl",
"images_per_s", "peak_mem_gb"}], "skipped": [{"what", "reason"}]}``, ``models-<device>.md`` and,
if matplotlib is importable, ``models-<device>.png``.

Needs a CUDA GPU and timm; where either is missing it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ["resnet50", "resnest50d", "resnest50d_4s2x40d", "res2net50_26w_4s", "skresnext50_32x4d"]
IMPLS = ["eager", "eager+convert", "compile", "compile+convert"]
LAYOUTS = {"nchw": "contiguous_format", "nhwc": "channels_last"}
MODES = ["train", "infer"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--layouts", default="nchw,nhwc")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--time-budget", type=float, default=220.0, help="seconds; later rows are skipped")
    p.add_argument("--compile-estimate", type=float, default=60.0,
                   help="seconds a compiled row is assumed to need; not started with less budget left")
    p.add_argument("--backend", default="auto", help="splat backend given to splat.convert")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args, timm, torch):
        self.args, self.timm, self.torch = args, timm, torch
        self.start = time.perf_counter()
        self.records, self.skipped = [], []

    def left(self) -> float:
        return self.args.time_budget - (time.perf_counter() - self.start)

    def build(self, name, layout, impl, mode):
        torch = self.torch
        import splat

        model = self.timm.create_model(name, pretrained=False).cuda()
        model.train(mode == "train")
        if impl.endswith("+convert"):
            model = splat.convert(model, backend=self.args.backend)
            report = model.splat_conversion
            if not report.converted or report.skipped:
                raise RuntimeError(f"splat.convert did not replace every block of {name}: {report}")
        if layout == "nhwc":
            model = model.to(memory_format=torch.channels_last)
        runner = torch.compile(model) if impl.startswith("compile") else model
        return model, runner

    def measure(self, name, layout, mode, impl):
        torch = self.torch
        args = self.args
        batch = args.train_batch if mode == "train" else args.infer_batch
        model, runner = self.build(name, layout, impl, mode)
        fmt = getattr(torch, LAYOUTS[layout])
        x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=fmt)
        target = torch.randint(0, 1000, (batch,), device="cuda")
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if mode == "train" else None

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if mode == "train":
                    loss = torch.nn.functional.cross_entropy(runner(x), target)
                else:
                    with torch.no_grad():
                        runner(x)
                    return
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(args.iters):
            step()
        end.record()
        torch.cuda.synchronize()
        seconds = begin.elapsed_time(end) / 1000.0
        record = dict(model=name, layout=layout, mode=mode, impl=impl,
                      images_per_s=round(batch * args.iters / seconds, 1),
                      peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3))
        del model, runner, opt, x
        torch.cuda.empty_cache()
        return record

    def run(self, models, layouts, impls):
        torch = self.torch
        plan = []
        for compiled in (False, True):  # every eager row first: compile rows are the expensive ones
            for name in models:
                for layout in layouts:
                    for mode in MODES:
                        for impl in impls:
                            if impl.startswith("compile") != compiled:
                                continue
                            if name == "resnet50" and impl.endswith("+convert"):
                                continue
                            plan.append((name, layout, mode, impl))
        for what in plan:
            label = "/".join(what)
            need = self.args.compile_estimate if what[3].startswith("compile") else 5.0
            if self.left() < need:
                self.skipped.append(dict(what=label, reason=f"time budget ({self.args.time_budget:.0f} s) spent"))
                continue
            t0 = time.perf_counter()
            try:
                record = self.measure(*what)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                self.skipped.append(dict(what=label, reason="out of GPU memory"))
                print(f"{label:55s} out of memory", flush=True)
                continue
            except Exception as err:  # noqa: BLE001 - a failing row is reported, the others still run
                torch.cuda.empty_cache()
                self.skipped.append(dict(what=label, reason=f"{type(err).__name__}: {err}"[:300]))
                print(f"{label:55s} failed: {type(err).__name__}: {err}"[:200], flush=True)
                continue
            self.records.append(record)
            print(f"{label:55s} {record['images_per_s']:9.1f} img/s  {record['peak_mem_gb']:6.2f} GB"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def markdown(records, skipped) -> str:
    lines = ["| model | layout | mode | impl | images/s | vs eager | peak GB |", "|---|---|---|---|---:|---:|---:|"]
    eager = {(r["model"], r["layout"], r["mode"]): r["images_per_s"] for r in records if r["impl"] == "eager"}
    for r in records:
        base = eager.get((r["model"], r["layout"], r["mode"]))
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['model']} | {r['layout']} | {r['mode']} | {r['impl']} | {r['images_per_s']:.1f} "
                     f"| {ratio} | {r['peak_mem_gb']:.2f} |")
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {s['what']}: {s['reason']}" for s in skipped]
    return "\n".join(lines) + "\n"


def plot(records, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot written")
        return
    panels = [(m, lay) for m in MODES for lay in LAYOUTS]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (mode, layout) in zip(axes[0], panels):
        rows = [r for r in records if r["mode"] == mode and r["layout"] == layout]
        models = [m for m in MODELS if any(r["model"] == m for r in rows)]
        width = 0.8 / len(IMPLS)
        for i, impl in enumerate(IMPLS):
            values = [next((r["images_per_s"] for r in rows if r["model"] == m and r["impl"] == impl), 0.0)
                      for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))])
        ax.set_xticklabels(models, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{mode}, {layout}, bf16 autocast")
        ax.set_ylabel("images / s")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import timm
    except ImportError:
        print("timm is not installed: nothing to benchmark (pip install timm on the GPU machine)")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: bench_models.py times GPU training and inference only; nothing timed")
        return 0
    import triton  # noqa: F401 - version recorded

    torch.backends.cudnn.benchmark = True
    bench = Bench(args, timm, torch)
    bench.run(args.models.split(","), args.layouts.split(","), args.impls.split(","))
    device = torch.cuda.get_device_name()
    result = dict(
        device=device, torch=torch.__version__, triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        settings=dict(train_batch=args.train_batch, infer_batch=args.infer_batch, warmup=args.warmup,
                      iters=args.iters, dtype="bfloat16 autocast", image_size=224, timm=timm.__version__,
                      backend=args.backend, time_budget_s=args.time_budget),
        records=bench.records, skipped=bench.skipped,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "models-" + "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(bench.records, bench.skipped)
    (out / f"{stem}.md").write_text(f"# {device}, torch {torch.__version__}\n\n" + table)
    print(table)
    plot(bench.records, out / f"{stem}.png")
    print(f"wrote {out / stem}.json/.md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

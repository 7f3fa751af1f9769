#!/usr/bin/env python3
"""Host time per block step with every kernel replaced by its fake: a CPU proxy of eager overhead.

On a GPU an eager step costs the host a launch per kernel and per small PyTorch op, plus the
Python around them; where the GPU work is short (ResNeSt's 14x14 and 7x7 stages) the host can be
the bottleneck. This script measures that cost without a GPU: the fused modules run on the torch
backend with each kernel call replaced by the kernel's fake (one call that allocates its outputs,
as a launch would), on tiny CPU tensors, against the reference modules of ``tests/reference``.
A Triton launch costs the host more than the fake does, so the fused figures are a lower bound.

For each block: a training step (forward and backward, train mode) and an eval forward under
``torch.no_grad()``; best over interleaved rounds of the mean microseconds per call. On a GPU,
``bench_blocks.py`` records the real figure (``host_ms``).

    python3 benchmarks/bench_host.py [--rounds 20] [--calls 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import splat  # noqa: E402
from splat import _cuda  # noqa: E402
from splat import backend as _backend  # noqa: E402
from tests.reference.res2net import Bottle2neck  # noqa: E402
from tests.reference.sk import SelectiveKernel, SKConv  # noqa: E402
from tests.reference.splat import SplAtConv2d, SplitAttn  # noqa: E402

# name: (reference builder, fused class, input channels); 16 channels, 4x4 maps, batch 2.
BLOCKS = {
    "splat": (lambda: SplAtConv2d(16, 16, 3, padding=1, radix=2, norm_layer=torch.nn.BatchNorm2d),
              splat.FusedSplAtConv2d, 16),
    "splat-r4g2": (lambda: SplitAttn(16, 16, radix=4, groups=2), splat.FusedSplAtConv2d, 16),
    "sk": (lambda: SKConv(16, 4, 2, 1, 2), splat.FusedSKConv, 16),
    "timm-sk": (lambda: SelectiveKernel(16, 16), splat.FusedSKConv, 16),
    "res2net": (lambda: Bottle2neck(64, 16), splat.FusedBottle2neck, 64),
}


def fake_kernels():
    """Route every kernel call of every backend to the kernel's fake."""
    fakes = _cuda._fakes()
    _backend.call = lambda backend, name, reference, *args: fakes[name](*args)


def best_us(fns: dict, rounds: int, calls: int) -> dict:
    """{name: best over rounds of the mean us per call}, the functions interleaved round by round."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
    return best


def steps(module, x):
    """(training step, eval forward) of ``module`` and of an eval-mode copy of it."""
    module.train()
    inference = copy.deepcopy(module).eval()

    def train():
        module(x).sum().backward()

    def infer():
        with torch.no_grad():
            inference(x)

    return train, infer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default=",".join(BLOCKS), help="comma-separated: " + ",".join(BLOCKS))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fake_kernels()
    rows = []
    for name in args.blocks.split(","):
        build, cls, channels = BLOCKS[name]
        torch.manual_seed(0)
        ref = build()
        fused = cls.from_module(ref, backend="torch")
        x = torch.randn(2, channels, 4, 4, requires_grad=True)
        (ref_train, ref_eval), (fused_train, fused_eval) = steps(ref, x), steps(fused, x)
        us = best_us({"ref train": ref_train, "fused train": fused_train, "ref eval": ref_eval,
                      "fused eval": fused_eval}, args.rounds, args.calls)
        rows.append({"block": name, **{k.replace(" ", "_") + "_us": round(v, 1) for k, v in us.items()}})
    print(f"host us per call, kernels faked, torch {torch.__version__}, 1 thread (best of {args.rounds} rounds)")
    print(f"{'block':12s} {'train ref':>10s} {'fused':>8s} {'ratio':>6s}   {'eval ref':>9s} {'fused':>8s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['block']:12s} {r['ref_train_us']:10.0f} {r['fused_train_us']:8.0f} "
              f"{r['fused_train_us'] / r['ref_train_us']:6.2f}   {r['ref_eval_us']:9.0f} {r['fused_eval_us']:8.0f} "
              f"{r['fused_eval_us'] / r['ref_eval_us']:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

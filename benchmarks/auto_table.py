#!/usr/bin/env python3
"""Turn bench_blocks.py results into the table ``backend="auto"`` reads (splat/auto_backend.json).

    python3 benchmarks/auto_table.py benchmarks/results/blocks-<gpu>.json [...]

For each op and shape class (``splat.backend.shape_class``: dtype, layout, map size) the choice is
the backend with the least total time over the cases every candidate backend was timed on: the
per-op timings (forward + backward; for ``split_attention`` the whole op, forward and backward) for
the split-attention ops, and the Res2Net blocks' forward+backward times (which differ only in the
chain op) for ``res2net_chain``. Where fewer than two backends were timed there is nothing to
choose and "auto" keeps its default (Triton).
The device's entry replaces any earlier one for the same device; other devices' entries stay.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_blocks  # noqa: E402
from splat import backend as _backend  # noqa: E402


def _class_of(dname: str, lname: str, hw: int) -> str:
    """The shape class of a (·, ·, hw, hw) tensor of that dtype and layout."""
    t = torch.empty((1, 2, hw, hw), dtype=bench_blocks.DTYPES[dname], device="meta")
    return _backend.shape_class(t.contiguous(memory_format=bench_blocks.LAYOUTS[lname]))


def timings(doc: dict) -> dict:
    """{(op, shape class): {backend: {case: time}}} from one bench_blocks.py JSON document."""
    out: dict = {}
    for o in doc.get("ops", []):
        if o["pass"].startswith("bwd-"):  # a kernel of split_attention's backward, timed in its "fwd+bwd" too
            continue
        case = (o["config"], o["pass"])
        out.setdefault((o["op"], o["shape_class"]), {}).setdefault(o["backend"], {})[case] = o["us"]
    hw = {c.name: c.hw for c in bench_blocks.FAMILIES["res2net"].configs}
    for r in doc.get("records", []):
        if r["block"] != "res2net" or r["mode"] != "fwd+bwd" or not r["impl"].startswith("res2net-"):
            continue
        backend = r["impl"].removeprefix("res2net-")
        if backend == "torch":
            continue
        key = ("res2net_chain", _class_of(r["dtype"], r["layout"], hw[r["config"]]))
        out.setdefault(key, {}).setdefault(backend, {})[(r["config"], r["mode"])] = r["ms"]
    return out


def choices(doc: dict) -> dict:
    """{op: {shape class: backend}}: the fastest backend where at least two were timed."""
    table: dict = {}
    for (op, key), per_backend in sorted(timings(doc).items()):
        if len(per_backend) < 2:
            continue
        common = set.intersection(*(set(cases) for cases in per_backend.values()))
        if not common:
            continue
        best = min(sorted(per_backend), key=lambda b: sum(per_backend[b][c] for c in common))
        table.setdefault(op, {})[key] = best
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="blocks-<device>.json files written by bench_blocks.py on a GPU")
    p.add_argument("--table", default=str(_backend.AUTO_TABLE_PATH), help="the table to update")
    args = p.parse_args(argv)
    path = Path(args.table)
    table = json.loads(path.read_text()) if path.exists() else {}
    for result in args.results:
        doc = json.loads(Path(result).read_text())
        if not doc.get("gpu_timed"):
            print(f"{result}: not a GPU run; skipped")
            continue
        chosen = choices(doc)
        if not chosen:
            print(f"{result}: no op was timed on two backends; nothing to choose")
            continue
        table[doc["device"]] = {"torch": doc["torch"], "triton": doc["triton"], "date": doc["date"],
                                "source": Path(result).name, "choices": chosen}
        for op, per_class in chosen.items():
            print(f"{doc['device']}: {op}: " + ", ".join(f"{k} -> {b}" for k, b in per_class.items()))
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

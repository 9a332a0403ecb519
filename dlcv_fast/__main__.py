"""Command line: ``python -m dlcv_fast {check,bench,demo}``.

- ``check``: every op of every backend that runs here against PyTorch; a pass/fail table.
- ``bench [--op NAME] [--dtype fp32 bf16 ...] [--batch N] [--json FILE] [--save DIR]``:
  per shape, backend, median time, GB/s, fraction of the measured copy bandwidth and
  speedup against PyTorch in the same run.
- ``demo``: ``check``, then ``bench`` of every op on whatever device is here.

On a machine without a GPU, the triton backend runs through Triton's interpreter (check
only: interpreted kernels are not timed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import dlcv_fast  # noqa: E402
from dlcv_fast import bench, check  # noqa: E402


def _check(args) -> int:
    rows = check.run(args.op)
    print(check.format_rows(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _bench(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.dtype or (["bf16", "fp32"] if device.type == "cuda" else ["fp32"])
    dtypes = [bench.DTYPES[n] for n in names]
    batch = args.batch or (128 if device.type == "cuda" else 8)
    backends = args.backend or bench.default_backends(device)
    env = bench.environment(device)
    peak = bench.copy_bandwidth_gbps(device)
    print(f"{env['device']}; torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}; "
          f"commit {env['commit']}; {env['date']}")
    print(f"measured copy bandwidth: {peak:.1f} GB/s (the 'peak' column is a fraction of it)")
    out = {"environment": env, "copy_gbps": peak, "batch": batch, "results": []}
    for op in args.op or dlcv_fast.OPS:
        print(f"\n{op}, batch {batch}:")
        results = list(bench.BENCHMARKS[op](device, dtypes, batch, backends))
        print(bench.format_table(results, peak))
        print("\ngeometric-mean speedup over PyTorch:")
        for key, value in bench.geomean_speedups(results).items():
            print(f"  {key:<28} {value:.2f}x")
        out["results"] += [dict(dataclasses.asdict(r), speedup=r.speedup, gbps=r.gbps,
                                peak_fraction=r.gbps / peak,
                                **({"tflops": r.tflops} if r.flops else {}))
                           for r in results]
    paths = [args.json] if args.json else []
    if args.save:
        slug = env["device"].replace(" ", "-").replace("/", "-")
        paths.append(os.path.join(args.save, f"{'+'.join(args.op or dlcv_fast.OPS)}-"
                                             f"{slug}-{env['date'][:10]}.json"))
    for path in paths:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {path}")
    return 0


def _demo(args) -> int:
    print("== check: every op of every backend here against PyTorch ==\n")
    status = _check(argparse.Namespace(op=None))
    print("\n== bench: dlcv_fast against PyTorch ==\n")
    quick = argparse.Namespace(op=None, dtype=None, batch=None, backend=None, json=None,
                               save=None)
    return status or _bench(quick)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlcv_fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="compare every op and backend with PyTorch")
    p.add_argument("--op", nargs="*", choices=dlcv_fast.OPS)
    p.set_defaults(fn=_check)
    p = sub.add_parser("bench", help="time every op against PyTorch")
    p.add_argument("--op", nargs="*", choices=dlcv_fast.OPS)
    p.add_argument("--dtype", nargs="*", choices=sorted(bench.DTYPES))
    p.add_argument("--backend", nargs="*", choices=["cpu", "cuda", "triton"])
    p.add_argument("--batch", type=int)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--save", metavar="DIR",
                   help="write the results to DIR/<ops>-<device>-<date>.json")
    p.set_defaults(fn=_bench)
    p = sub.add_parser("demo", help="check, then bench")
    p.set_defaults(fn=_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m dlcv_fast {check,bench,demo,lenet,profile,diffuse}``.

- ``check``: every op of every backend that runs here against PyTorch; a pass/fail table.
- ``bench [--op NAME] [--dtype fp32 bf16 ...] [--batch N] [--json FILE] [--save DIR]``:
  per shape, backend, median time, GB/s and fraction of the measured copy bandwidth
  (compute-bound ops: TFLOP/s and fraction of the measured matrix-product throughput), and
  speedup against PyTorch in the same run; ``--op models``: whole models against
  torchvision's.
- ``demo``: ``check``, then ``bench`` of every op on whatever device is here, then
  ``lenet``.
- ``lenet [--epochs N] [--out PNG] [--quick]``: trains LeNet-5 on dlcv_fast's layers on
  scikit-learn's digits (32x32), prints the test accuracy, writes the loss and accuracy
  curves.
- ``profile --model NAME --batch N [--dtype fp32|fp16|bf16] [--image-size N] [--out PNG]``:
  per-layer table of every dlcv_fast layer of a model (``dlcv_fast.models`` names, or any
  torchvision model converted with ``dlcv_fast.convert``) against its torch.nn original,
  totals, and a PNG bar chart.
- ``diffuse [--epochs N] [--steps N] [--seed N] [--out PNG] [--quick]``: trains a small
  DDPM (``diffusion_unet``) on the same digits at 16x16 with the fused noise kernels,
  samples 64 digits with DDIM, prints how many a classifier trained on real digits
  recognises, writes them as a PNG grid.

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
    ops = args.op or dlcv_fast.OPS
    peak_tflops = {}
    if bench.COMPUTE_BOUND & set(ops):
        peak_tflops = {str(t).removeprefix("torch."): bench.matmul_tflops(device, t)
                       for t in dtypes}
        print("measured matrix-product throughput (TFLOP/s; the 'peak' column of compute-bound "
              "ops is a fraction of it): "
              + ", ".join(f"{k} {v:.3g}" for k, v in peak_tflops.items()))
    out = {"environment": env, "copy_gbps": peak, "matmul_tflops": peak_tflops, "batch": batch,
           "results": []}
    for op in ops:
        op_batch = batch if args.batch or device.type == "cuda" else bench.CPU_BATCH.get(op, batch)
        print(f"\n{op}, batch {op_batch}:")
        results = list(bench.BENCHMARKS[op](device, dtypes, op_batch, backends))
        print(bench.format_table(results, peak, peak_tflops))
        print("\ngeometric-mean speedup over PyTorch:")
        for key, value in bench.geomean_speedups(results).items():
            print(f"  {key:<28} {value:.2f}x")
        out["results"] += [dict(dataclasses.asdict(r), speedup=r.speedup, gbps=r.gbps,
                                tflops=r.tflops,
                                peak_fraction=bench.peak_fraction(r, peak, peak_tflops))
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
    status = status or _bench(quick)
    print("\n== LeNet-5 on scikit-learn digits, trained on dlcv_fast layers ==\n")
    return _lenet(argparse.Namespace(epochs=None, out=None, quick=False)) or status


def _writable(command: str, path: str | None) -> bool:
    """Whether ``--out`` can be written (its folder is created here); if not, a usage error
    is printed: found before the work, not after it."""
    if path is None:
        return True
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        existed = os.path.exists(path)
        with open(path, "ab"):
            pass
        if not existed:
            os.remove(path)
    except OSError as e:
        print(f"python -m dlcv_fast {command}: cannot write --out {path}: {e.strerror}",
              file=sys.stderr)
        return False
    return True


def _lenet(args) -> int:
    from dlcv_fast.demos import lenet

    if not _writable("lenet", args.out):
        return 2
    kwargs = {"quick": args.quick}
    if args.epochs:
        kwargs["epochs"] = args.epochs
    if args.out:
        kwargs["out"] = args.out
    accuracy = lenet.main(**kwargs)
    if not args.quick and accuracy < 0.97:
        print(f"test accuracy {100 * accuracy:.2f}% is below the 97% this demo promises")
        return 1
    return 0


def _profile(args) -> int:
    from dlcv_fast import profile

    if not _writable("profile", args.out):
        return 2
    try:
        model = profile.build_model(args.model, args.image_size)
        return profile.main(args.model, args.batch, bench.DTYPES[args.dtype], args.image_size,
                            args.out, budget_s=args.budget, built=model)
    except profile.ModelChoiceError as e:
        print(f"python -m dlcv_fast profile: {e}", file=sys.stderr)
        return 2


def _diffuse(args) -> int:
    from dlcv_fast.demos import diffuse

    if args.steps > diffuse.TRAIN_TIMESTEPS:
        print(f"python -m dlcv_fast diffuse: --steps must be at most the "
              f"{diffuse.TRAIN_TIMESTEPS} training timesteps, got {args.steps}", file=sys.stderr)
        return 2
    if not _writable("diffuse", args.out):
        return 2
    kwargs = {"quick": args.quick, "steps": args.steps, "seed": args.seed}
    if args.epochs:
        kwargs["epochs"] = args.epochs
    if args.out:
        kwargs["out"] = args.out
    confident = diffuse.main(**kwargs)
    if not args.quick and confident < diffuse.PROMISED:
        print(f"{100 * confident:.1f}% of the samples recognised is below the "
              f"{100 * diffuse.PROMISED:.0f}% this demo promises")
        return 1
    return 0


def _positive(kind):
    """An argparse type: a number of ``kind`` above 0 (0 and negatives are usage errors)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _seed(text: str) -> int:
    """An argparse type: a seed in [0, 2^32) (what NumPy's and scikit-learn's take)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}")
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2^32), got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlcv_fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="compare every op and backend with PyTorch")
    p.add_argument("--op", nargs="*", choices=dlcv_fast.OPS)
    p.set_defaults(fn=_check)
    p = sub.add_parser("bench", help="time every op against PyTorch")
    p.add_argument("--op", nargs="*", choices=[*dlcv_fast.OPS, "models"],
                   help="default: every op; 'models' times whole models (ResNet-50 training "
                        "step, ViT-B/16 forward+backward) against torchvision's")
    p.add_argument("--dtype", nargs="*", choices=sorted(bench.DTYPES))
    p.add_argument("--backend", nargs="*", choices=["cpu", "cuda", "triton"])
    p.add_argument("--batch", type=_positive(int))
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--save", metavar="DIR",
                   help="write the results to DIR/<ops>-<device>-<date>.json")
    p.set_defaults(fn=_bench)
    p = sub.add_parser("demo", help="check, then bench, then lenet")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("lenet", help="train LeNet-5 on scikit-learn's digits")
    p.add_argument("--epochs", type=_positive(int), help="default 10")
    p.add_argument("--out", help="PNG of the curves (default demo_output/lenet5_digits.png)")
    p.add_argument("--quick", action="store_true", help="4 epochs on 500 images (tests)")
    p.set_defaults(fn=_lenet)
    p = sub.add_parser("profile", help="per-layer times of a model against PyTorch")
    p.add_argument("--model", required=True,
                   help="a dlcv_fast.models name (lenet5, alexnet, vgg16_bn, resnet50, "
                        "googlenet, vit_b_16, ...) or a torchvision model name")
    p.add_argument("--batch", type=_positive(int), default=1)
    p.add_argument("--dtype", default="fp32", choices=sorted(bench.DTYPES))
    p.add_argument("--image-size", type=_positive(int), help="default: the model's (224; lenet5 32)")
    p.add_argument("--out", help="PNG bar chart (default demo_output/profile-NAME-bN.png)")
    p.add_argument("--budget", type=_positive(float), default=0.2,
                   help="seconds of timing per layer and implementation (default 0.2)")
    p.set_defaults(fn=_profile)
    p = sub.add_parser("diffuse", help="train a small DDPM on the digits, sample with DDIM")
    p.add_argument("--epochs", type=_positive(int), help="default 45")
    p.add_argument("--steps", type=_positive(int), default=50, help="DDIM sampling steps (default 50)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", help="PNG of the samples (default demo_output/ddpm_digits.png)")
    p.add_argument("--quick", action="store_true",
                   help="2 epochs on 256 images, 16 samples in 5 steps (tests)")
    p.set_defaults(fn=_diffuse)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

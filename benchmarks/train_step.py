"""Training step: tokens/s, peak memory and MFU of vanilla, PonderLM-2 and PonderLM-3 at the same
K, and the PonderLM-3 / PonderLM-2 step-time ratio (router + mask overhead).

    python benchmarks/train_step.py                    # CPU, fp32
    python benchmarks/train_step.py --device cuda      # bf16 autocast

MFU = model FLOPs/s (ponderlm.model.flops.training_flops_per_token at the step's Jacobi count) over the
matmul peak of the same machine, measured in the same run (a large torch.mm in the training dtype).
Target (issue 7): PonderLM-3 step time <= 1.05x PonderLM-2's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    base_parser,
    finish,
    isolated_peak_mb,
    machine,
    matmul_peak_flops,
    max_rss_mb,
    reset_peak_rss,
    setup,
    sync,
    table,
    timeit_interleaved,
    train_step_fn,
)

from ponderlm.model.flops import training_flops_per_token

METHODS = ("vanilla", "ponderlm2", "ponderlm3")


def build(args, method: str, device, dtype):
    return train_step_fn(args, device, dtype, method=method)


def probe(args) -> None:
    device, dtype = setup(args)
    base = reset_peak_rss()
    _, step = build(args, args.method, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else max_rss_mb() - base
    print(f'{{"peak_mb": {peak}}}')


def main() -> None:
    import argparse

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--jacobi", type=int, default=3, help="Jacobi refinements per step (fixed for the comparison)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="vanilla", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        return probe(args)
    device, dtype = setup(args)
    peak = matmul_peak_flops(device, dtype)
    rows = []
    tokens = args.batch * args.seq_len
    built = {method: build(args, method, device, dtype) for method in METHODS}
    secs = timeit_interleaved({m: step for m, (_, step) in built.items()}, device, args.repeats)
    for method in METHODS:
        cfg, s = built[method][0], secs[method]
        flops = training_flops_per_token(cfg, args.seq_len, args.jacobi) * tokens
        sub = ["--probe", "--method", method, "--device", args.device, "--threads", str(args.threads)]
        for k in ("d_model", "layers", "heads", "d_ff", "vocab", "K", "seq_len", "batch", "jacobi"):
            sub += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        if args.dtype:
            sub += ["--dtype", args.dtype]
        rows.append({"method": method, "step_s": s, "tokens_per_s": tokens / s, "model_tflops": flops / s / 1e12,
                     "mfu": flops / s / peak, "peak_mb": isolated_peak_mb(__file__, sub)["peak_mb"]})  # fmt: skip
    by = {r["method"]: r for r in rows}
    ratio = by["ponderlm3"]["step_s"] / by["ponderlm2"]["step_s"]
    print(f"Training step, {device} {str(dtype).removeprefix('torch.')}: d={args.d_model}, {args.layers} layers, "
          f"K={args.K}, J={args.jacobi}, batch {args.batch} x {args.seq_len} tokens; median of {args.repeats} "
          f"(methods timed in turns); "
          f"matmul peak {peak / 1e12:.3f} TFLOP/s (torch.mm, same run)\n")  # fmt: skip
    print(table(rows, [("method", "method", "s"), ("step_s", "step s", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("model_tflops", "model TFLOP/s", ".4f"), ("mfu", "MFU", ".3f"),
                       ("peak_mb", "peak MB", ".0f")]))  # fmt: skip
    print(f"\nPonderLM-3 / PonderLM-2 step time: {ratio:.3f} (target <= 1.05)\n")
    keys = ("d_model", "layers", "heads", "d_ff", "vocab", "K", "seq_len", "batch", "jacobi")
    finish({"benchmark": "train_step", "device": str(device), "dtype": str(dtype), **machine(),
            "matmul_peak_flops": peak, "config": {k: getattr(args, k) for k in keys}, "rows": rows,
            "p3_over_p2_step_time": ratio}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()

"""Training speed levers for pondering models (issue 15): PonderLM-3 training steps with lower
precision (bf16 autocast, on CPU as on CUDA) and truncated backpropagation through the Jacobi
passes (``model.jacobi_grad_passes``), each timed in turns against today's default (fp32, every
pass backpropagated) and against vanilla, with the machine's fp32 and bf16 matmul peaks measured
in the same run.

    python benchmarks/train_speed.py                                   # d=256, 4 layers, K=3
    python benchmarks/train_speed.py --d-model 64 --layers 2 --d-ff 172 --seq-len 128 --batch 16   # quickstart size

Speed only: whether a lever changes what is learned is measured by training (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ponderlm.model.flops import training_flops_per_token

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    add_model_args,
    base_parser,
    bench_config,
    finish,
    machine,
    matmul_peak_flops,
    setup,
    table,
    timeit_interleaved,
    train_step_fn,
)

# name: (method, autocast dtype or None, jacobi_grad_passes)
VARIANTS = {
    "vanilla fp32": ("vanilla", None, 0),
    "p3 fp32, all passes (reference)": ("ponderlm3", None, 0),
    "p3 fp32, last 2 passes": ("ponderlm3", None, 2),
    "p3 fp32, last pass": ("ponderlm3", None, 1),
    "p3 bf16, all passes": ("ponderlm3", torch.bfloat16, 0),
    "p3 bf16, last 2 passes": ("ponderlm3", torch.bfloat16, 2),
    "p3 bf16, last pass": ("ponderlm3", torch.bfloat16, 1),
}
COMPILED = ("vanilla fp32", "p3 fp32, last 2 passes", "p3 fp32, last pass", "p3 bf16, last pass")  # --compile
BASE = "p3 fp32, all passes (reference)"  # every pass backpropagated, fp32: the default before issue 15


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_model_args(p, K=3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--jacobi", type=int, default=3, help="Jacobi refinements per step (fixed for the comparison)")
    p.add_argument(
        "--compile", action="store_true", help="also time compiled blocks (train.compile) of " + ", ".join(COMPILED)
    )
    args = p.parse_args()
    device, _ = setup(args)
    peaks = {d: matmul_peak_flops(device, getattr(torch, d)) for d in ("float32", "bfloat16")}
    variants = {name: (*v, False) for name, v in VARIANTS.items()}
    if args.compile:
        variants.update({f"{name}, compiled": (*VARIANTS[name], True) for name in COMPILED})
    steps = {name: train_step_fn(args, device, amp, compile_blocks=c, method=method, jacobi_grad_passes=n)[1]
             for name, (method, amp, n, c) in variants.items()}  # fmt: skip
    secs = timeit_interleaved(steps, device, args.repeats)
    tokens = args.batch * args.seq_len
    rows = []
    for name, s in secs.items():
        method, amp, n, _ = variants[name]
        cfg = bench_config(args, method, jacobi_grad_passes=n)
        flops = training_flops_per_token(cfg, args.seq_len, args.jacobi)  # what the step computes, J fixed
        peak = peaks["bfloat16" if amp is not None else "float32"]
        rows.append({"variant": name, "step_s": s, "tokens_per_s": tokens / s, "speedup": secs[BASE] / s,
                     "train_mflops_per_token": flops / 1e6, "mfu": tokens / s * flops / peak})  # fmt: skip
    print(f"PonderLM-3 training step on {device}: d={args.d_model}, {args.layers} layers, K={args.K}, J={args.jacobi}, "
          f"batch {args.batch} x {args.seq_len}; median of {args.repeats}, variants timed in turns. Matmul peak "
          f"fp32 {peaks['float32'] / 1e12:.3f}, bf16 {peaks['bfloat16'] / 1e12:.3f} TFLOP/s "
          f"(ratio {peaks['bfloat16'] / peaks['float32']:.2f})\n")  # fmt: skip
    print(table(rows, [("variant", "variant", "s"), ("step_s", "step s", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("speedup", f"x {BASE}", ".2f"),
                       ("train_mflops_per_token", "MFLOPs/token", ".1f"), ("mfu", "MFU", ".1%")]))  # fmt: skip
    keys = ("d_model", "layers", "heads", "d_ff", "vocab", "K", "seq_len", "batch", "jacobi")
    finish({"benchmark": "train_speed", "device": str(device), **machine(), "matmul_peak_flops": peaks,
            "config": {k: getattr(args, k) for k in keys}, "rows": rows}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()

"""Operator profiles (torch.profiler) of the hot paths: a training step, scoring, decoding.

    python benchmarks/profile_ops.py train --method ponderlm3        # one soft Jacobi training step
    python benchmarks/profile_ops.py score                           # hard-pruned parallel forward
    python benchmarks/profile_ops.py decode --batch 16 --schedule slot

Prints the operators by self time (CPU, or CUDA kernels with --device cuda) over --steps runs
after a warm-up, and ends with one JSON line (operator, self seconds, share, calls). Model sizes
are those of train_step.py and inference.py (same flags); docs/PERFORMANCE.md summarises them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import inference
import train_step
from common import base_parser, finish, machine, setup, sync


def workload(args, device, dtype):
    """A zero-argument function running one unit of the chosen path."""
    if args.path == "train":
        return train_step.build(args, args.method, device, dtype)[1]
    model = inference.random_model(args).to(device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    with torch.no_grad():
        tau = inference.calibrate_tau(model, ids, args.depth)

    @torch.no_grad()
    def run():
        if args.path == "score":
            model(ids, mode="hard", tau=tau)
        else:
            prompt = ids[:, : args.prompt_len]
            model.generate(prompt, args.new_tokens, tau=tau, schedule=args.schedule)

    return run


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("path", choices=["train", "score", "decode"])
    p.add_argument("--method", default="ponderlm3", help="train: vanilla, ponderlm2 or ponderlm3")
    p.add_argument("--schedule", default="auto", help="decode: token, slot or auto")
    p.add_argument("--steps", type=int, default=3, help="profiled runs (after one warm-up)")
    p.add_argument("--top", type=int, default=15, help="operators shown")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--K", type=int, default=None, help="latent steps (default: 2 for train, 3 otherwise)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--jacobi", type=int, default=3)
    p.add_argument("--depth", type=float, default=1.5, help="score/decode: realised mean depth of the router")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    args.K = args.K if args.K is not None else (2 if args.path == "train" else 3)
    device, dtype = setup(args)
    run = workload(args, device, dtype)
    run()  # warm-up
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            run()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # microseconds
    avgs = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in avgs) or 1.0
    ops = [{"op": e.key, "self_s": getattr(e, attr) / 1e6 / args.steps, "share": getattr(e, attr) / total,
            "calls": e.count // args.steps} for e in avgs[: args.top]]  # fmt: skip
    what = {"train": f"training step ({args.method})", "score": "scoring", "decode": f"decode ({args.schedule})"}
    print(f"Profile: {what[args.path]}, {device} {str(dtype).removeprefix('torch.')}, d={args.d_model}, "
          f"{args.layers} layers, K={args.K}; per run, total self time {total / 1e6 / args.steps:.3f} s\n")  # fmt: skip
    print("| operator | self s | share | calls |\n|---|---:|---:|---:|")
    for o in ops:
        print(f"| `{o['op']}` | {o['self_s']:.4f} | {o['share']:.1%} | {o['calls']} |")
    print()
    finish({"benchmark": "profile", "path": args.path, "device": str(device), **machine(),
            "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "total_self_s": total / 1e6 / args.steps, "ops": ops}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()

"""torch.compile on CPU (``train.compile``), measured for every method: one training step of each
method eager and with its blocks compiled exactly as the trainer compiles them, timed in turns,
with the compile time (the first step) and the first step's loss difference (compiled kernels
reorder float sums; a large difference would mean the compiled model is not the same model).
The compile time is the first compiled step less a later one; TorchInductor caches compiled
kernels on disk, so a second run of this script (or a later method sharing kernels) reads less.

    python benchmarks/compile_speed.py --d-model 64 --layers 2 --heads 4 --d-ff 172 --seq-len 128 --batch 16
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_args, base_parser, finish, machine, setup, table, timeit_interleaved

from ponderlm import ModelConfig, PonderLM, ponder_loss
from ponderlm.model.config import METHODS
from ponderlm.training.trainer import compile_blocks


def step_fn(args, device: torch.device, method: str, compiled: bool):
    """A soft-mode training step (J fixed) of a fresh model of ``method``; returns step() -> loss."""
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      d_ff=args.d_ff, max_seq_len=args.seq_len, method=method, max_ponder_steps=args.K,
                      penalty_weight=0.05 if method == "ponderlm3" else 0.0,
                      jacobi_grad_passes=args.grad_passes)  # fmt: skip
    torch.manual_seed(0)
    model = PonderLM(cfg).to(device)
    if compiled:
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)

    def step() -> float:
        out = model(ids[:, :-1], mode="soft", jacobi_iters=args.jacobi)
        loss, _ = ponder_loss(out, ids[:, 1:], cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_model_args(p, K=3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--jacobi", type=int, default=3)
    p.add_argument("--grad-passes", type=int, default=0, help="model.jacobi_grad_passes of the slot methods")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    args = p.parse_args()
    device, _ = setup(args)
    rows = []
    for method in args.methods:
        eager, comp = step_fn(args, device, method, False), step_fn(args, device, method, True)
        loss_e = eager()
        t0 = time.perf_counter()
        loss_c = comp()
        t_first = time.perf_counter() - t0
        secs = timeit_interleaved({"eager": eager, "compiled": comp}, device, args.repeats, warmup=1)
        t_compile = t_first - secs["compiled"]  # the first compiled step less a compiled one
        rows.append({"method": method, "eager_s": secs["eager"], "compiled_s": secs["compiled"],
                     "speedup": secs["eager"] / secs["compiled"], "compile_s": t_compile,
                     "first_loss_diff": abs(loss_e - loss_c)})  # fmt: skip
        print(f"{method}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"Training step, eager against compiled blocks, on {device}: d={args.d_model}, {args.layers} layers, "
          f"K={args.K}, J={args.jacobi}, jacobi_grad_passes={args.grad_passes}, batch {args.batch} x {args.seq_len}; "
          f"median of {args.repeats}, in turns\n")  # fmt: skip
    print(table(rows, [("method", "method", "s"), ("eager_s", "eager s", ".3f"), ("compiled_s", "compiled s", ".3f"),
                       ("speedup", "speedup", ".2f"), ("compile_s", "compile s", ".0f"),
                       ("first_loss_diff", "|loss diff|", ".1e")]))  # fmt: skip
    keys = ("d_model", "layers", "heads", "d_ff", "vocab", "K", "seq_len", "batch", "jacobi", "grad_passes")
    finish({"benchmark": "compile_speed", "device": str(device), **machine(),
            "config": {k: getattr(args, k) for k in keys}, "rows": rows}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()

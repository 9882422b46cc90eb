"""How far is the scoring computation from the one ``generate`` runs? Validation loss of a
checkpoint in hard mode with J Jacobi refinements (J = 1, 3, 10, 30), with the convergence rule
(refine until no latent moves by more than a tolerance), and in the exact recurrence, at each tau;
with the largest logit difference to exact and the time each took.

    python benchmarks/jacobi_gap.py --checkpoint runs/quickstart/ponderlm3 --tau 1e-4 0.05

Evaluation reports hard J=3 unless told otherwise (``ponderlm eval --mode/--jacobi-iters/--jacobi-tol``);
this is the measurement that says how much that choice matters for a trained model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import base_parser, finish, machine, setup, table

from ponderlm.data import TokenShards, eval_windows
from ponderlm.loading import checkpoint_dataset, load_model
from ponderlm.model.recurrence import PREFILL_TOL


def score(model, windows: torch.Tensor, batch: int, **kw) -> tuple[float, torch.Tensor, float]:
    """(mean next-token loss, logits (N, T, V), seconds) of one computation over the windows."""
    t0 = time.perf_counter()
    losses, logits = [], []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = windows[i : i + batch]
            out = model(w[:, :-1], **kw)
            logits.append(out.logits.float())
            losses.append(F.cross_entropy(out.logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
    n = windows[:, 1:].numel()
    return float(sum(losses)) / n, torch.cat(logits), time.perf_counter() - t0


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a run, checkpoint or export with latent thoughts")
    p.add_argument("--tau", type=float, nargs="+", default=[1e-4])
    p.add_argument("--windows", type=int, default=32, help="validation windows")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, nargs="+", default=[1, 3, 10, 30])
    args = p.parse_args()
    device, _ = setup(args)
    model, _, ck = load_model(args.checkpoint, str(device))
    data_dir, _ = checkpoint_dataset(ck, None)
    windows = eval_windows(TokenShards(data_dir, "val"), model.cfg.max_seq_len, args.windows).to(device)
    rows = []
    for tau in args.tau:
        ref, ref_logits, ref_s = score(model, windows, args.batch, mode="exact", tau=tau)
        variants = {f"hard J={J}": {"jacobi_iters": J} for J in args.iters}
        variants[f"hard, converged to {PREFILL_TOL:g}"] = {"jacobi_iters": 30, "jacobi_tol": PREFILL_TOL}
        rows.append({"tau": tau, "computation": "exact", "loss": ref, "gap": 0.0, "max_logit_diff": 0.0,
                     "seconds": ref_s})  # fmt: skip
        for name, kw in variants.items():
            loss, logits, s = score(model, windows, args.batch, mode="hard", tau=tau, **kw)
            rows.append({"tau": tau, "computation": name, "loss": loss, "gap": loss - ref,
                         "max_logit_diff": float((logits - ref_logits).abs().max()), "seconds": s})  # fmt: skip
    print(f"{ck} ({model.cfg.method}, K={model.cfg.max_depth}): {args.windows} validation windows of "
          f"{model.cfg.max_seq_len} tokens\n")  # fmt: skip
    print(table(rows, [("tau", "tau", "g"), ("computation", "computation", "s"), ("loss", "val loss", ".5f"),
                       ("gap", "loss - exact", "+.2e"), ("max_logit_diff", "max |logit - exact|", ".1e"),
                       ("seconds", "s", ".1f")]))  # fmt: skip
    finish({"benchmark": "jacobi_gap", "checkpoint": str(ck), **machine(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()

"""Prefill: how long the prompt takes before the first token, per prefill computation.

A latent-thought model (PonderLM-2, or PonderLM-3 with --checkpoint) prefills a prompt of each
length with ``exact`` (the recurrence, slot by slot: what decoding means), ``converged`` (Jacobi
passes until no latent moves by more than PREFILL_TOL, the cache filled from the converged pass)
and ``parallel`` (a fixed J=3: fast, not exact), against ``vanilla`` (the same backbone without
pondering). Timed in turns; reported: seconds, converged's speedup over exact, the passes it ran,
and the largest logit difference to exact (the price of the tolerance).

    python benchmarks/prefill.py                                   # random PonderLM-2, K=3, d=256
    python benchmarks/prefill.py --checkpoint runs/quickstart/ponderlm3 --lengths 32 128

Random weights converge slowly (no training has made the recurrence contract); a trained
checkpoint is the realistic case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_args, base_parser, finish, machine, setup, table, timeit_interleaved

from ponderlm import ModelConfig, PonderLM
from ponderlm.model.recurrence import prefill


def build(args) -> PonderLM:
    if args.checkpoint:
        from ponderlm.loading import load_model

        return load_model(args.checkpoint)[0]
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      d_ff=args.d_ff, max_seq_len=1024, method="ponderlm2", max_ponder_steps=args.K)  # fmt: skip
    torch.manual_seed(0)
    return PonderLM(cfg)


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="a run or export (default: a random model)")
    add_model_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 256, 512])
    p.add_argument("--tau", type=float, default=None, help="pruning threshold (default: the model's)")
    args = p.parse_args()
    device, dtype = setup(args)
    model = build(args).to(device=device, dtype=dtype).eval()
    vanilla = PonderLM(model.cfg.replace(method="vanilla")).to(device=device, dtype=dtype).eval()
    vanilla.load_state_dict(model.state_dict(), strict=False)
    rows = []
    for T in args.lengths:
        ids = torch.randint(0, model.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
        with torch.no_grad():
            ref, _ = prefill(model, ids, tau=args.tau, how="exact")
            conv, _ = prefill(model, ids, tau=args.tau, how="converged")
            fns = {how: (lambda how=how, ids=ids: prefill(model, ids, tau=args.tau, how=how))
                   for how in ("exact", "converged", "parallel")}  # fmt: skip
            fns["vanilla"] = lambda ids=ids: prefill(vanilla, ids, how="parallel")
            t = timeit_interleaved(fns, device, args.repeats, warmup=1)
        rows.append({"T": T, **{f"{k}_s": v for k, v in t.items()}, "speedup": t["exact"] / t["converged"],
                     "passes": conv.jacobi_passes, "converged": bool(conv.converged),
                     "max_logit_diff": float((conv.logits - ref.logits).abs().max())})  # fmt: skip
    cols = [("T", "prompt", "d"), ("exact_s", "exact s", ".3f"), ("converged_s", "converged s", ".3f"),
            ("parallel_s", "parallel J=3 s", ".3f"), ("vanilla_s", "vanilla s", ".3f"),
            ("speedup", "exact / converged", ".2f"), ("passes", "passes", "d"),
            ("max_logit_diff", "max |logit - exact|", ".1e")]  # fmt: skip
    print(table(rows, cols))
    finish({"benchmark": "prefill", "machine": machine(), "method": model.cfg.method, "K": model.cfg.max_depth,
            "d_model": model.cfg.d_model, "rows": rows}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()

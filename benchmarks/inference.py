"""Inference: does pruning turn saved FLOPs into saved time? A PonderLM-3 model at a realised mean
depth against the same weights forced to full depth K (PonderLM-2's cost) and against vanilla
(the same backbone, no pondering): decode tokens/s at batch 1 and 16, and scoring (the hard-pruned
parallel forward used for log-likelihoods). Decoding at batch 16 is timed with both schedules of
ponderlm.model.generate, in turns with the same baselines: "token" (all rows advance a token per step,
so a step costs its deepest row) and "slot" (each row advances one slot per call); full depth
runs with the token schedule, the best one when every row has depth K. A decode case is the
exact prefill of --prompt-len tokens plus --new-tokens generated tokens.

    python benchmarks/inference.py                                  # a random model, tau chosen for depth 1.5
    python benchmarks/inference.py --checkpoint runs/pareto_cpu/p3-k3-l0.05 --tau 0.05

Reported per case: realised speedup over full depth, the ideal speedup from the FLOPs at the
realised depths (ponderlm.model.flops), and their ratio: the fraction of the saved FLOPs that became
saved time. Target (issue 7): >= 0.9 for decode at batch 1 and for scoring.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_args, base_parser, finish, machine, setup, table, timeit_interleaved

from ponderlm import ModelConfig, PonderLM
from ponderlm.model.flops import inference_flops

FULL_TAU = 1e-30  # every reach probability passes: the PonderLM-2 computation with the same weights


def random_model(args) -> PonderLM:
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      d_ff=args.d_ff, max_seq_len=1024, method="ponderlm3", max_ponder_steps=args.K,
                      router_init_bias=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = PonderLM(cfg)
    with torch.no_grad():  # a router whose choice varies by token: a spread of realised depths
        model.router.proj.weight.normal_(0, 0.5)
    return model


def calibrate_tau(model, ids, target: float) -> float:
    """The tau whose realised mean depth on ids is closest to target (bisection in log tau)."""
    lo, hi = -30.0, -1e-6
    for _ in range(30):
        mid = (lo + hi) / 2
        d = float(model(ids, mode="hard", tau=float(torch.tensor(mid).exp())).depth.float().mean())
        lo, hi = (mid, hi) if d > target else (lo, mid)
    return float(torch.tensor((lo + hi) / 2).exp())


def vanilla_twin(model: PonderLM) -> PonderLM:
    twin = PonderLM(model.cfg.replace(method="vanilla"))
    twin.load_state_dict(model.state_dict(), strict=False)
    return twin


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="a trained PonderLM-3 run (default: random model)")
    p.add_argument("--tau", type=float, default=None, help="pruning threshold (default: calibrated to --depth)")
    p.add_argument("--depth", type=float, default=1.5, help="target realised mean depth for the random model")
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--score-batch", type=int, default=8)
    p.add_argument("--score-len", type=int, default=256)
    args = p.parse_args()
    device, dtype = setup(args)
    if args.checkpoint is not None:
        from ponderlm.loading import load_model

        model = load_model(args.checkpoint)[0]
        if not model.cfg.has_router:
            raise SystemExit(f"error: {args.checkpoint} is not a PonderLM-3 model")
    else:
        model = random_model(args)
    model = model.to(device, dtype).eval()
    twin = vanilla_twin(model).to(device, dtype).eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    score_ids = torch.randint(0, cfg.vocab_size, (args.score_batch, args.score_len), generator=g).to(device)
    with torch.no_grad():
        tau = args.tau if args.tau is not None else calibrate_tau(model, score_ids, args.depth)
    rows = []

    def case(name: str, variants: dict, fn_full, fn_van, depth_full) -> None:
        """variants: label -> (PonderLM-3 fn, its realised depths); all timed in turns with the
        full-depth and vanilla fns, so every row of one case shares the same baseline timings."""
        fns = {label: fn for label, (fn, _) in variants.items()}
        t = timeit_interleaved({**fns, "full": fn_full, "vanilla": fn_van}, device, args.repeats)
        for label, (_, depth_p3) in variants.items():
            ideal = inference_flops(cfg, depth_full).total / inference_flops(cfg, depth_p3).total
            speedup = t["full"] / t[label]
            rows.append({"case": name + label, "p3_s": t[label], "full_s": t["full"], "vanilla_s": t["vanilla"],
                         "mean_depth": float(depth_p3.float().mean()), "speedup": speedup, "ideal": ideal,
                         "ratio": speedup / ideal})  # fmt: skip

    with torch.no_grad():
        hard = model(score_ids, mode="hard", tau=tau)
        full = model(score_ids, mode="hard", tau=FULL_TAU)
        case(
            "scoring",
            {"": (lambda: model(score_ids, mode="hard", tau=tau), hard.depth)},
            lambda: model(score_ids, mode="hard", tau=FULL_TAU),
            lambda: twin(score_ids, mode="hard"),
            full.depth,
        )
        for B in (1, 16):
            prompt = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).to(device)
            # full depth runs as PonderLM-2 would: every row at depth K, the token schedule (the
            # slot schedule only adds bookkeeping when all depths are equal)
            ref_full = model.generate(prompt, args.new_tokens, tau=FULL_TAU, schedule="token")
            variants = {}
            for schedule in ("token", "slot") if B > 1 else ("token",):
                ref = model.generate(prompt, args.new_tokens, tau=tau, schedule=schedule)
                fn = lambda prompt=prompt, s=schedule: model.generate(prompt, args.new_tokens, tau=tau, schedule=s)  # noqa: E731
                variants[f", {schedule} schedule" if B > 1 else ""] = (fn, torch.cat([ref.prompt_depth, ref.depth], 1))
            case(
                f"decode batch {B}",
                variants,
                lambda prompt=prompt: model.generate(prompt, args.new_tokens, tau=FULL_TAU, schedule="token"),
                lambda prompt=prompt: twin.generate(prompt, args.new_tokens),
                torch.cat([ref_full.prompt_depth, ref_full.depth], 1),
            )
    src = str(args.checkpoint) if args.checkpoint else f"random d={args.d_model} L={args.layers} K={args.K}"
    print(f"Inference, {device} {str(dtype).removeprefix('torch.')}, {src}, tau={tau:.3g}; median of "
          f"{args.repeats}, timed in turns; full = same weights at depth K, "
          f"vanilla = same backbone without pondering\n")  # fmt: skip
    print(table(rows, [("case", "case", "s"), ("mean_depth", "mean depth", ".2f"), ("p3_s", "PonderLM-3 s", ".4f"),
                       ("full_s", "full depth s", ".4f"), ("vanilla_s", "vanilla s", ".4f"),
                       ("speedup", "speedup vs full", ".3f"), ("ideal", "ideal (FLOPs)", ".3f"),
                       ("ratio", "speedup / ideal", ".3f")]))  # fmt: skip
    print()
    finish({"benchmark": "inference", "device": str(device), "dtype": str(dtype), **machine(), "source": src,
            "tau": tau, "rows": rows}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()

"""The quickstart at cpu_text's backbone shape, timed end to end: the measurement behind keeping
the quickstart's d=64 shape (docs/LOG.md, 2026-12-01).

Builds a 1,024-entry BPE copy of the default corpus in OUT/data (the packages come from the same
cache as `ponderlm data prepare`), then runs the quickstart's three models — vanilla, PonderLM-2
K=2 and PonderLM-3 K=2 λ=0.05, same data and steps — at d=128, 4 layers, context 256, bf16,
evaluated like the quickstart (hard mode, converged, 64 windows, taus 1e-4 / 0.05 / 0.2), and
prints the time of each phase. Writes only under OUT, which must not exist yet.

    python benchmarks/quickstart_shape.py --out /tmp/qs_d128 --steps 230     # ~15 min, 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ponderlm.data import PrepareConfig, prepare
from ponderlm.experiments import ExperimentConfig, run_experiment


def experiment(out: Path, steps: int) -> ExperimentConfig:
    base = {
        "model": dict(d_model=128, n_layers=4, n_heads=4, d_ff=344, max_seq_len=256, max_ponder_steps=2,
                      penalty_weight=0.05, router_init_bias=2.0),
        "train": dict(data_dir=str(out / "data"), seq_len=256, batch_size=8, max_steps=steps, lr=3e-3,
                      dtype="bf16", warmup_steps=max(1, steps // 10), eval_interval=0, eval_windows=64,
                      log_interval=max(1, steps // 10), ckpt_interval=0, keep_last=1),
    }  # fmt: skip
    runs = [{"name": m, "set": [f"model.method={m}"]} for m in ("vanilla", "ponderlm2", "ponderlm3")]
    cfg = ExperimentConfig(name="quickstart_d128", out_dir=str(out / "runs"), base=base, runs=runs,
                           taus=[1e-4, 0.05, 0.2], eval_windows=64)  # fmt: skip
    cfg.validate()
    return cfg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="a new directory for the data and runs")
    p.add_argument("--steps", type=int, default=230, help="training steps per model (8 x 256 tokens each)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ponderlm" / "packages")
    args = p.parse_args()
    if args.out.exists():
        print(f"error: {args.out} exists; pass a new directory", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    t0 = time.time()
    prepare(PrepareConfig(out_dir=args.out / "data", cache_dir=args.cache_dir, vocab_size=1024))
    t1 = time.time()
    run_experiment(experiment(args.out, args.steps), args.cache_dir, stem="report")
    t2 = time.time()
    print(f"data {t1 - t0:.1f} s, training and evaluation {t2 - t1:.1f} s, total {(t2 - t0) / 60:.2f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

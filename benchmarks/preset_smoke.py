"""Smoke test of an experiment preset on this machine: every run's config exactly as the preset
gives it, except the number of steps (and, past --max-batch, the batch, which only rescales the
projection), trained for a few steps into a scratch directory. Prints per run the step time
(median of the steps after the first two), tokens/s, peak GPU memory, whether every loss was
finite, and the projected wall time of the full run on this device; ends with one JSON line.

    python benchmarks/preset_smoke.py --config configs/experiments/gpu_70m.yaml --data data/neox
    python benchmarks/preset_smoke.py --config configs/experiments/gpu_410m.yaml --runs vanilla p3-k3-l0.05

It trains with the package's own trainer (bf16 autocast, fused AdamW on CUDA), so a preset that
passes here runs unchanged under ``ponderlm experiment pareto``; the timings are a few steps of a
cold process, for planning, not benchmarks.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import finish, machine

from ponderlm.experiments import ExperimentConfig
from ponderlm.training.trainer import train

STEP_LINE = re.compile(r"^step (\d+)/\d+\s+loss (\S+)")


def smoke(cfg: ExperimentConfig, run: dict, steps: int, max_batch: int, data: str | None, scratch: Path) -> dict:
    rc = cfg.run_config(run, cfg.run_seeds(run)[0])
    full_steps, full_batch = rc.train.max_steps, rc.train.batch_size
    batch = full_batch
    if batch > max_batch:  # a whole number of micro-batches, at most max_batch sequences
        micro = rc.train.micro_batch_size or batch
        batch = max(micro, max_batch // micro * micro)
    rc.train.max_steps, rc.train.batch_size = steps, batch
    rc.train.warmup_steps = min(rc.train.warmup_steps, steps)
    rc.train.eval_interval, rc.train.ckpt_interval, rc.train.log_interval = 0, 0, 1
    rc.train.eval_windows, rc.train.progress = 2, False
    rc.train.out_dir = str(scratch / run["name"])
    if data:
        rc.train.data_dir = data
    stamps: list[tuple[int, float, float]] = []

    def log(line: str) -> None:
        m = STEP_LINE.match(str(line))
        if m:
            stamps.append((int(m.group(1)), float(m.group(2)), time.perf_counter()))

    gc.collect()
    if torch.cuda.is_available():  # each run starts from an empty cache: its peak is its own
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(rc, set(), log=log)
    total = time.perf_counter() - t0
    shutil.rmtree(scratch / run["name"], ignore_errors=True)
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(stamps) if a[0] >= 2]
    step_s = statistics.median(gaps) if gaps else float("nan")
    tokens = batch * rc.train.seq_len
    return {
        "run": run["name"],
        "method": rc.model.method,
        "n_layers": rc.model.n_layers,
        "batch": batch,
        "full_batch": full_batch,
        "seq_len": rc.train.seq_len,
        "steps": len(stamps),
        "finite": len(stamps) == steps and all(math.isfinite(s[1]) for s in stamps),
        "first_loss": stamps[0][1] if stamps else None,
        "last_loss": stamps[-1][1] if stamps else None,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s if gaps else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "wall_s": total,
        "projected_full_run_h": step_s * full_batch / batch * full_steps / 3600 if gaps else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="an experiment file")
    p.add_argument("--runs", nargs="*", default=None, help="run names (default: every run, first seed)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--max-batch", type=int, default=64, help="sequences per step at most (projection rescales)")
    p.add_argument("--data", default=None, help="train.data_dir instead of the preset's")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = p.parse_args()
    cfg = ExperimentConfig.load(args.config)
    runs = [r for r in cfg.runs if args.runs is None or r["name"] in args.runs]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ponderlm-smoke-") as tmp:
        for run in runs:
            row = smoke(cfg, run, args.steps, args.max_batch, args.data, Path(tmp))
            rows.append(row)
            print(f"{row['run']:<14} {row['method']:<10} L={row['n_layers']:<3} batch {row['batch']:>4}/"
                  f"{row['full_batch']:<4} step {row['step_s']:.3f} s  {row['tokens_per_s'] or 0:>10,.0f} tok/s  "
                  f"peak {row['peak_gib'] or 0:6.2f} GiB  finite {row['finite']}  loss {row['first_loss']:.3f} "
                  f"-> {row['last_loss']:.3f}  full run ~{row['projected_full_run_h'] or 0:.2f} h",
                  flush=True)  # fmt: skip
    finish({"benchmark": "preset_smoke", "config": str(args.config), **machine(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()

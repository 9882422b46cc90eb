"""``ponderlm quickstart``: the default corpus, three small models, one report.

Prepares the offline corpus if needed, then runs a small Pareto experiment
(:mod:`ponderlm.experiments`): vanilla, PonderLM-2 and PonderLM-3 with the same backbone, data and
number of steps, evaluated by validation loss in the inference computation, with inference FLOPs
per token and realised depth (PonderLM-3 at several tau). Writes ``report.md``, ``report.json``
and ``report.png``. Finished runs are reused (``--overwrite`` retrains).
"""

from __future__ import annotations

from pathlib import Path

from ponderlm.data import PrepareConfig, prepare
from ponderlm.experiments import ExperimentConfig, run_experiment

TAUS = [1e-4, 0.05, 0.2]
# what the banner announces, as measured on 2 idle CPU cores with the corpus already built
# (docs/PERFORMANCE.md, "End-to-end times"): the full run 13.6-16.8 min, --smoke 1 min 38 s
FULL_TIME = "about 15 minutes on 2 idle CPU cores (--smoke: about 2)"
SMOKE_TIME = "smoke run, about 2 minutes on 2 idle CPU cores"


def quickstart_experiment(out: Path, data: Path, smoke: bool) -> ExperimentConfig:
    steps = 30 if smoke else 550
    base = {
        "model": dict(d_model=64, n_layers=2, n_heads=4, d_ff=172, max_seq_len=128, max_ponder_steps=2,
                      penalty_weight=0.05, router_init_bias=2.0),
        "train": dict(data_dir=str(data), seq_len=128, batch_size=16, max_steps=steps, lr=3e-3,
                      warmup_steps=max(1, steps // 10), eval_interval=0, eval_windows=16 if smoke else 64,
                      log_interval=max(1, steps // 10), ckpt_interval=0, keep_last=1),
    }  # fmt: skip
    runs = [{"name": m, "set": [f"model.method={m}"]} for m in ("vanilla", "ponderlm2", "ponderlm3")]
    cfg = ExperimentConfig(
        name="quickstart", out_dir=str(out), base=base, runs=runs, taus=TAUS, eval_windows=16 if smoke else 64
    )
    cfg.validate()
    return cfg


def quickstart(out: Path, data: Path, cache_dir: Path, smoke: bool = False, overwrite: bool = False) -> int:
    print(
        "ponderlm quickstart: "
        + (SMOKE_TIME if smoke else FULL_TIME)
        + "; longer beside other work; building the corpus the first time adds 1-2 minutes"
        + f"; results go to {out}/"
    )
    prepare(PrepareConfig(out_dir=data, cache_dir=cache_dir))
    run_experiment(quickstart_experiment(out, data, smoke), cache_dir, overwrite=overwrite, stem="report")
    return 0

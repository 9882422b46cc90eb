"""``ponderlm quickstart``: the default corpus, three small models, one report.

Prepares the offline corpus if needed, trains vanilla, PonderLM-2 and PonderLM-3 with the same
backbone, data and number of steps, evaluates validation perplexity with inference FLOPs per
token and realised depth (PonderLM-3 at several tau), and writes ``report.md``,
``results.json`` and ``quality_vs_flops.png``. Finished runs are reused (``--overwrite``
retrains).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, load_model_weights
from .config import ModelConfig, RunConfig, TrainConfig
from .data import PrepareConfig, TokenShards, eval_windows, prepare
from .eval.perplexity import perplexity
from .model import PonderLM
from .train import train

METHODS = ("vanilla", "ponderlm2", "ponderlm3")
TAUS = (1e-4, 0.05, 0.2)


def quickstart_configs(out: Path, data: Path, smoke: bool) -> dict[str, RunConfig]:
    steps = 30 if smoke else 550
    runs = {}
    for method in METHODS:
        model = ModelConfig(
            d_model=64, n_layers=2, n_heads=4, d_ff=172, max_seq_len=128, method=method,
            max_ponder_steps=2, penalty_weight=0.05, router_init_bias=2.0,
        )  # fmt: skip
        tr = TrainConfig(
            data_dir=str(data), out_dir=str(out / method), seq_len=128, batch_size=16,
            max_steps=steps, lr=3e-3, warmup_steps=max(1, steps // 10), eval_interval=0,
            eval_windows=16 if smoke else 64, log_interval=max(1, steps // 10), ckpt_interval=0,
            keep_last=1, progress=True,
        )  # fmt: skip
        runs[method] = RunConfig(model=model, train=tr)
    return runs


def evaluate_run(run_dir: Path, data: Path, seq_len: int, windows: int) -> dict:
    ck = load_checkpoint(latest_checkpoint(run_dir), with_optimizer=False)
    cfg: ModelConfig = ck["model_config"]
    model = PonderLM(cfg)
    load_model_weights(model, ck["model_state"])
    val = eval_windows(TokenShards(data, "val"), seq_len, windows)
    taus = TAUS if cfg.has_router else (cfg.tau,)
    rows = []
    for tau in taus:
        r = perplexity(model, val, mode="hard", tau=tau, batch_size=16)
        rows.append({"tau": tau, **r})
    soft = perplexity(model, val, mode="soft", batch_size=16)
    return {
        "method": cfg.method,
        "params": model.num_parameters(),
        "steps": ck["trainer_state"]["step"],
        "tokens": ck["trainer_state"]["tokens_seen"],
        "soft_loss": soft["loss"],
        "evals": rows,
    }


def report_markdown(results: list[dict], minutes: float) -> str:
    lines = [
        "# Quickstart report",
        "",
        f"Three models with the same backbone, data and steps; {minutes:.1f} min in all. Validation loss",
        "is measured in the hard-pruned inference computation (Jacobi J=3) at each tau, next to the",
        "inference FLOPs per token implied by the realised depths. `soft loss` is the training",
        "computation, for comparison.",
        "",
        "| method | params | steps | tokens | tau | val loss | val ppl | mean depth | MFLOPs/token | soft loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for e in r["evals"]:
            lines.append(
                f"| {r['method']} | {r['params']:,} | {r['steps']} | {r['tokens']:,} | {e['tau']:g} | "
                f"{e['loss']:.4f} | {e['ppl']:.2f} | {e['mean_depth']:.2f} | {e['flops_per_token'] / 1e6:.3f} | "
                f"{r['soft_loss']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        xs = [e["flops_per_token"] / 1e6 for e in r["evals"]]
        ys = [e["ppl"] for e in r["evals"]]
        ax.plot(xs, ys, marker="o", label=r["method"])
        if len(r["evals"]) > 1:
            for e, x, y in zip(r["evals"], xs, ys, strict=True):
                ax.annotate(f"tau={e['tau']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("inference MFLOPs per token")
    ax.set_ylabel("validation perplexity")
    ax.set_title("quality vs inference compute (quickstart)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _finished(run_dir: Path, steps: int) -> bool:
    ck = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return ck is not None and json.loads((ck / "trainer_state.json").read_text())["step"] >= steps


def quickstart(out: Path, data: Path, cache_dir: Path, smoke: bool = False, overwrite: bool = False) -> int:
    t0 = time.time()
    print(
        "ponderlm quickstart: "
        + ("smoke run, about 2 minutes" if smoke else "about 15 minutes on 2 CPU cores (--smoke: about 2)")
        + f"; results go to {out}/"
    )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prepare(PrepareConfig(out_dir=data, cache_dir=cache_dir))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for method, cfg in quickstart_configs(out, data, smoke).items():
        run_dir = Path(cfg.train.out_dir)
        if not overwrite and _finished(run_dir, cfg.train.max_steps):
            print(f"\n== {method}: finished run found in {run_dir}, reusing it")
        else:
            print(f"\n== training {method}")
            train(cfg, set(), overwrite=True)
        results.append(evaluate_run(run_dir, data, cfg.train.seq_len, cfg.train.eval_windows))
    minutes = (time.time() - t0) / 60
    md = report_markdown(results, minutes)
    (out / ".report.md.tmp").write_text(md)
    (out / ".report.md.tmp").replace(out / "report.md")
    (out / ".results.json.tmp").write_text(json.dumps(results, indent=2) + "\n")
    (out / ".results.json.tmp").replace(out / "results.json")
    plot(results, out / "quality_vs_flops.png")
    print("\n" + md)
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}, {out / 'quality_vs_flops.png'} ({minutes:.1f} min)")
    return 0

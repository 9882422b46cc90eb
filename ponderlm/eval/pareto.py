"""``ponderlm experiment pareto``: train (or reuse) a grid of runs, evaluate each at several tau,
and plot quality against inference FLOPs per token with the Pareto frontier marked.

An experiment file (``configs/experiments/*.yaml``)::

    name: cpu
    out_dir: runs/pareto_cpu
    base:            # a RunConfig shared by every run (model: ..., train: ...)
      model: {d_model: 64, ...}
      train: {data_dir: data/default, max_steps: 800, ...}
    runs:            # each: a name, dotted overrides of base, optionally its own seeds
      - {name: vanilla, set: [model.method=vanilla], seeds: [0, 1]}
      - {name: p3-l0.05, set: [model.method=ponderlm3, model.penalty_weight=0.05]}
    taus: [1.0e-4, 0.05, 0.2]   # PonderLM-3 runs are evaluated at each; others once
    seeds: [0]                  # every run is trained once per seed (unless it lists its own)
    eval_windows: 128           # validation windows for perplexity
    tasks: []                   # zero-shot tasks for an average accuracy (optional)
    task_limit: null
    ablations: []               # on PonderLM-3 runs: fixed, random, entropy (eval.ablations)

A run trained with the first seed lives in ``out_dir/<name>``, other seeds in
``out_dir/<name>-s<seed>``. Finished runs (a checkpoint at train.max_steps) are reused, so an
interrupted experiment continues where it stopped, and so are their evaluations
(``<run>/experiment_eval.json``, keyed by the checkpoint and every evaluation setting).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import latest_checkpoint, list_checkpoints
from ..config import ConfigError, RunConfig, check_tau, load_run_config, read_yaml_mapping
from ..data import TokenShards, eval_windows, load_meta
from ..owned import DirLock, OwnershipError, atomic_write, is_empty_dir, is_kind, make_owned_dir, read_marker
from .perplexity import perplexity
from .run import load_model


@dataclass
class ExperimentConfig:
    name: str
    out_dir: str
    base: dict[str, Any]
    runs: list[dict[str, Any]]
    taus: list[float] = field(default_factory=lambda: [1e-4])
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_windows: int = 128
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    ablations: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        p = Path(path)
        raw = read_yaml_mapping(p, "experiment")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{p}: unknown experiment key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        missing = [k for k in ("name", "out_dir", "base", "runs") if k not in raw]
        if missing:
            raise ConfigError(f"{p}: missing {', '.join(missing)}")
        shapes = {"name": str, "out_dir": str, "base": dict, "runs": list, "taus": list, "seeds": list, "tasks": list,
                  "ablations": list, "eval_windows": int}  # fmt: skip
        for key, kind in shapes.items():
            if key in raw and not isinstance(raw[key], kind):
                raise ConfigError(f"{p}: {key} must be a {kind.__name__}, got {type(raw[key]).__name__}")
        if not all(isinstance(r, dict) for r in raw["runs"]):
            raise ConfigError(f"{p}: every entry of runs must be a mapping (name, set, seeds)")
        cfg = cls(**raw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for t in self.taus:
            check_tau(t)
        from .ablations import ABLATIONS

        bad = sorted(set(self.ablations) - set(ABLATIONS))
        if bad:
            raise ConfigError(f"unknown ablation(s) {', '.join(bad)}; known: {', '.join(ABLATIONS)}")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        names = [r.get("name") for r in self.runs]
        if not self.runs or any(not isinstance(n, str) or not n for n in names):
            raise ConfigError("every experiment run needs a non-empty name")
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate run names in the experiment: {names}")
        for r in self.runs:
            sets = r.get("set", [])
            if not isinstance(sets, list) or not all(isinstance(x, str) for x in sets):
                raise ConfigError(f"run {r['name']!r}: set must be a list of key=value strings")
            seeds = self.run_seeds(r)
            if not seeds or not all(isinstance(x, int) for x in seeds):
                raise ConfigError(f"run {r['name']!r}: seeds must be a non-empty list of integers")
            self.run_config(r, seeds[0])  # fail early on bad overrides

    def run_seeds(self, run: dict[str, Any]) -> list[int]:
        return list(run.get("seeds", self.seeds))

    def run_config(self, run: dict[str, Any], seed: int) -> RunConfig:
        unknown = sorted(set(run) - {"name", "set", "seeds"})
        if unknown:
            raise ConfigError(f"run {run.get('name')!r}: unknown key(s) {', '.join(unknown)} (use name, set, seeds)")
        out = Path(self.out_dir) / (run["name"] if seed == self.seeds[0] else f"{run['name']}-s{seed}")
        overrides = [*run.get("set", []), f"train.out_dir={out}", f"train.seed={seed}"]
        cfg, _ = load_run_config(self.base, overrides)
        return cfg


def finished(run_dir: Path, steps: int) -> bool:
    ck = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return ck is not None and json.loads((ck / "trainer_state.json").read_text())["step"] >= steps


# train.* fields that do not change what a run learns: a finished run is reused whatever they say
BOOKKEEPING = {"out_dir", "progress", "log_interval", "eval_interval", "eval_windows", "eval_tau", "ckpt_interval",
               "keep_last", "tensorboard", "wandb", "wandb_project", "device", "threads", "dist_timeout_s", "compile",
               "dist", "verify_data"}  # fmt: skip


def config_differences(run_dir: Path, requested: RunConfig) -> list[str]:
    """How the run in ``run_dir`` (its saved, resolved config.yaml) differs from the ``requested``
    one once the dataset has resolved it as the trainer would; [] when it is the same run."""
    from ..train import resolve_model_config

    want = RunConfig(model=requested.model.replace(), train=requested.train)
    meta = load_meta(Path(requested.train.data_dir))
    resolve_model_config(want, set(), int(meta["tokenizer"]["vocab_size"]))
    have, _ = load_run_config(run_dir / "config.yaml")
    diffs = []
    for section in ("model", "train"):
        a, b = getattr(have, section).__dict__, getattr(want, section).__dict__
        for k in a:
            if a[k] != b[k] and not (section == "train" and k in BOOKKEEPING):
                diffs.append(f"{section}.{k}: {a[k]!r} -> {b[k]!r}")
    return diffs


def check_experiment_dir(out: Path, names: set[str]) -> None:
    """An experiment writes run directories and its report files into out_dir; refuse a directory
    that holds anything else unless ponderlm made it for an experiment."""
    if not out.exists() or is_empty_dir(out):
        return
    if not out.is_dir():
        raise OwnershipError(f"experiment out_dir {out} is a file; choose a directory")
    marker = read_marker(out)
    if marker is not None:
        if marker["kind"] != "experiment":
            raise OwnershipError(f"experiment out_dir {out} is a ponderlm {marker['kind']}; choose another out_dir")
        return
    for p in out.iterdir():  # made before markers existed: runs and reports only
        if p.name.startswith(".") or p.name in names or (p.is_dir() and is_kind(p, "run")):
            continue
        raise OwnershipError(
            f"experiment out_dir {out} holds {p.name}, which ponderlm did not write; choose another out_dir"
        )


def evaluate_run(
    run_dir: Path,
    data_dir: Path,
    taus: list[float],
    windows: int,
    tasks: dict | None = None,
    ablations: list[str] = (),
) -> dict[str, Any]:
    """Validation loss (hard mode) at each tau (one tau for methods without a router), with mean
    depth and inference FLOPs/token; zero-shot average accuracy when tasks are given; for
    PonderLM-3 the requested ablations (fixed depths 0..K; random/entropy at every tau)."""
    from .ablations import Ablation
    from .zeroshot import score_task

    model, tok, ck = load_model(run_dir)
    cfg = model.cfg
    val = eval_windows(TokenShards(data_dir, "val"), cfg.max_seq_len, windows)
    rows = []
    for tau in taus if cfg.has_router else taus[:1]:
        r = perplexity(model, val, mode="hard", tau=tau, batch_size=16)
        row = {"tau": tau, **r}
        if tasks:
            accs = {name: score_task(model, tok, docs, tau=tau)["acc"] for name, docs in tasks.items()}
            row["zeroshot"] = accs
            row["zeroshot_avg"] = sum(accs.values()) / len(accs)
        rows.append(row)
    abl = []
    if cfg.has_router:
        for policy in ablations:
            if policy == "fixed":
                for d in range(cfg.max_depth + 1):
                    r = perplexity(model, val, mode="hard", batch_size=16, ablation=Ablation("fixed", depth=d))
                    abl.append({"policy": "fixed", "depth": d, "tau": None, **r})
            else:
                for tau in taus:
                    r = perplexity(model, val, mode="hard", tau=tau, batch_size=16, ablation=Ablation(policy))
                    abl.append({"policy": policy, "depth": None, "tau": tau, **r})
    soft = perplexity(model, val, mode="soft", batch_size=16)
    state = json.loads((ck / "trainer_state.json").read_text())
    return {
        "method": cfg.method,
        "K": cfg.max_depth,
        "penalty_weight": cfg.penalty_weight if cfg.has_router else None,
        "params": model.num_parameters(),
        "steps": state["step"],
        "tokens": state.get("tokens_seen", 0),
        "soft_loss": soft["loss"],
        "evals": rows,
        "ablations": abl,
    }


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (x) and loss (y), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def collect_points(results: list[dict]) -> list[dict]:
    """One point per (run, tau), averaged over seeds: cost, loss (mean, std) and depth."""
    groups: dict[tuple[str, float, str | None], list[tuple[dict, dict]]] = {}
    for r in results:
        for e in r["evals"]:
            groups.setdefault((r["run"], e["tau"], None), []).append((r, e))
        for a in r.get("ablations", []):
            label = f"fixed d={a['depth']}" if a["policy"] == "fixed" else a["policy"]
            groups.setdefault((r["run"], a["tau"], label), []).append((r, a))
    points = []
    for (run, tau, ablation), items in groups.items():
        losses = [e["loss"] for _, e in items]
        mean = sum(losses) / len(losses)
        std = (sum((x - mean) ** 2 for x in losses) / (len(losses) - 1)) ** 0.5 if len(losses) > 1 else 0.0
        r0, e0 = items[0]
        p = {
            "run": run if ablation is None else f"{run} [{ablation}]",
            "ablation": ablation,
            "method": r0["method"],
            "K": r0["K"],
            "penalty_weight": r0["penalty_weight"],
            "tau": tau if r0["method"] == "ponderlm3" and tau is not None else None,
            "seeds": len(items),
            "loss": mean,
            "loss_std": std,
            "ppl": math.exp(mean),
            "mean_depth": sum(e["mean_depth"] for _, e in items) / len(items),
            "flops_per_token": sum(e["flops_per_token"] for _, e in items) / len(items),
        }
        if "zeroshot_avg" in e0:
            p["zeroshot_avg"] = sum(e["zeroshot_avg"] for _, e in items) / len(items)
        points.append(p)
    # the frontier is over trained configurations; ablations are diagnostics of one of them
    main = [i for i, p in enumerate(points) if p["ablation"] is None]
    front = {main[j] for j in pareto_front([(points[i]["flops_per_token"], points[i]["loss"]) for i in main])}
    for i, p in enumerate(points):
        p["pareto"] = i in front
    return points


def markdown(title: str, points: list[dict], minutes: float | None = None) -> str:
    lines = [f"# {title}", ""]
    if minutes is not None:
        lines += [f"{minutes:.1f} min in all.", ""]
    lines += [
        "Validation loss in the hard-pruned inference computation; cost is inference FLOPs per token at the",
        "realised depths. `*` marks the Pareto frontier (no other point has both lower cost and lower loss);",
        "rows with [brackets] are inference-time ablations of a PonderLM-3 run, not on the frontier by design.",
        "",
        "| run | method | K | λ | tau | seeds | val loss | ± std | ppl | mean depth | MFLOPs/token | frontier |"
        + (" zero-shot avg |" if any("zeroshot_avg" in p for p in points) else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"
        + ("---:|" if any("zeroshot_avg" in p for p in points) else ""),
    ]
    for p in sorted(points, key=lambda q: q["flops_per_token"]):
        lam = "" if p["penalty_weight"] is None else f"{p['penalty_weight']:g}"
        tau = "" if p["tau"] is None else f"{p['tau']:g}"
        zs = f" {p['zeroshot_avg']:.4f} |" if "zeroshot_avg" in p else ""
        lines.append(
            f"| {p['run']} | {p['method']} | {p['K']} | {lam} | {tau} | {p['seeds']} | {p['loss']:.4f} | "
            f"{p['loss_std']:.4f} | {p['ppl']:.2f} | {p['mean_depth']:.2f} | {p['flops_per_token'] / 1e6:.3f} | "
            f"{'*' if p['pareto'] else ''} |" + zs
        )
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_zs = any("zeroshot_avg" in p for p in points)
    fig, axes = plt.subplots(1, 2 if has_zs else 1, figsize=(12 if has_zs else 7, 4.5), squeeze=False)
    markers = {"vanilla": "o", "pause": "P", "loop": "D", "ponderlm1": "v", "ponderlm2": "s", "ponderlm3": "^"}
    abl_markers = {"random": "x", "entropy": "+"}
    palette = plt.get_cmap("tab10").colors
    panels = [("loss", "validation loss (hard mode)")]
    if has_zs:
        panels.append(("zeroshot_avg", "zero-shot average accuracy"))
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        runs: dict[str, list[dict]] = {}
        for p in points:
            if key in p:
                abl = p["ablation"]
                name = (
                    p["run"]
                    if abl is None
                    else p["run"].rsplit(" [", 1)[0] + (" [fixed d]" if abl.startswith("fixed") else f" [{abl}]")
                )
                runs.setdefault(name, []).append(p)
        colours: dict[str, Any] = {}
        for run, ps in runs.items():
            ps = sorted(ps, key=lambda q: q["flops_per_token"])
            xs = [q["flops_per_token"] / 1e6 for q in ps]
            ys = [q[key] for q in ps]
            abl = ps[0]["ablation"]
            base = run.rsplit(" [", 1)[0]
            c = colours.setdefault(base, palette[len(colours) % len(palette)])
            if abl is None:
                ax.plot(xs, ys, marker=markers.get(ps[0]["method"], "o"), color=c, alpha=0.85, label=run)
            else:
                m = abl_markers.get(abl, "|")
                ax.plot(xs, ys, marker=m, color=c, alpha=0.6, ls=":", lw=0.8, ms=7, label=run)
            if key == "loss" and any(q["loss_std"] > 0 for q in ps):
                ax.errorbar(xs, ys, yerr=[q["loss_std"] for q in ps], fmt="none", color=c, alpha=0.5)
            for q, x, y in zip(ps, xs, ys, strict=True):
                if q["tau"] is not None:
                    ax.annotate(f"{q['tau']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        if key == "loss":
            fr = sorted((p for p in points if p["pareto"]), key=lambda q: q["flops_per_token"])
            fx, fy = [q["flops_per_token"] / 1e6 for q in fr], [q["loss"] for q in fr]
            ax.step(fx, fy, where="post", color="black", lw=1, ls="--")
            ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="black", label="Pareto frontier")
        ax.set_xlabel("inference MFLOPs per token")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def cached_evaluation(run_dir: Path, cfg: ExperimentConfig, compute) -> dict[str, Any]:
    """The run's evaluation under this experiment's settings, computed once per checkpoint."""
    ck = latest_checkpoint(run_dir)
    key = {
        "checkpoint": ck.name if ck else None,
        "manifest_sha": hashlib.sha256((ck / "manifest.json").read_bytes()).hexdigest() if ck else None,
        "taus": list(cfg.taus),
        "eval_windows": cfg.eval_windows,
        "tasks": list(cfg.tasks),
        "task_limit": cfg.task_limit,
        "ablations": list(cfg.ablations),
    }
    path = run_dir / "experiment_eval.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved["result"]
        except (json.JSONDecodeError, KeyError):
            pass
    result = compute()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    tmp.replace(path)
    return result


def run_experiment(
    cfg: ExperimentConfig,
    cache_dir: Path,
    *,
    overwrite: bool = False,
    eval_only: bool = False,
    log=print,
    stem: str = "pareto",
) -> dict[str, Any]:
    """Train, resume or reuse every run of the experiment, evaluate, and write the report; the
    experiment's out_dir is locked for the whole command."""

    out = Path(cfg.out_dir)
    with DirLock(out, "out_dir"):
        check_experiment_dir(out, {f"{stem}.{ext}" for ext in ("md", "json", "png")})
        return _run_experiment(cfg, cache_dir, out, overwrite=overwrite, eval_only=eval_only, log=log, stem=stem)


def check_reusable(rc: RunConfig, overwrite: bool) -> None:
    """Refuse to report a run trained with another config than the one the experiment asks for
    (checked for every run before anything is written); --overwrite retrains it instead."""
    run_dir = Path(rc.train.out_dir)
    if overwrite or not (run_dir / "config.yaml").is_file():
        return
    diffs = config_differences(run_dir, rc)
    if diffs:
        raise ConfigError(
            f"{run_dir} was trained with another config ({'; '.join(diffs[:3])}); pass --overwrite to retrain "
            "it, or give the run another name"
        )


def _prepare_run(rc: RunConfig, overwrite: bool, eval_only: bool, log, train, tag: str) -> bool:
    """Make the run of ``rc`` ready to report: reuse it when finished with the same config,
    resume it when unfinished, (re)train it when absent or --overwrite. A run trained with another
    config is refused. Returns False when --eval-only leaves it out."""
    run_dir = Path(rc.train.out_dir)
    exists = run_dir.is_dir() and not is_empty_dir(run_dir)
    if exists and not overwrite and finished(run_dir, rc.train.max_steps):
        log(f"\n== {tag} {run_dir.name}: finished run found, reusing it")
        return True
    if eval_only:
        log(f"\n== {tag} {run_dir.name}: not finished, left out (--eval-only)")
        return False
    resume = exists and not overwrite and bool(list_checkpoints(run_dir))
    log(f"\n== {tag} {'resuming' if resume else 'training'} {run_dir.name} ({rc.model.method})")
    train(rc, set(), resume=resume, overwrite=overwrite and exists, log=log)
    return True


def _run_experiment(cfg, cache_dir, out: Path, *, overwrite: bool, eval_only: bool, log, stem: str) -> dict[str, Any]:
    from ..train import train
    from .tasks import load_tasks

    t0 = time.time()
    for r in cfg.runs:
        for seed in cfg.run_seeds(r):
            check_reusable(cfg.run_config(r, seed), overwrite)
    make_owned_dir(out, "experiment")
    tasks = load_tasks(cfg.tasks, cache_dir, limit=cfg.task_limit, log=log) if cfg.tasks else None
    results = []
    jobs = [
        (seed, run)
        for seed in dict.fromkeys(s for r in cfg.runs for s in cfg.run_seeds(r))
        for run in cfg.runs
        if seed in cfg.run_seeds(run)
    ]  # first seed of every run first
    total = len(jobs)
    missing = []
    for n, (seed, run) in enumerate(jobs, 1):
        rc = cfg.run_config(run, seed)
        run_dir = Path(rc.train.out_dir)
        if not _prepare_run(rc, overwrite, eval_only, log, train, tag=f"[{n}/{total}]"):
            missing.append(run_dir.name)
            continue
        r = cached_evaluation(
            run_dir,
            cfg,
            lambda rc=rc, run_dir=run_dir: evaluate_run(
                run_dir, Path(rc.train.data_dir), list(cfg.taus), cfg.eval_windows, tasks, cfg.ablations
            ),
        )
        results.append({"run": run["name"], "seed": seed, **r})
    if not results:
        raise ConfigError("no finished run to report (--eval-only trains nothing)")
    points = collect_points(results)
    minutes = (time.time() - t0) / 60
    md = markdown(f"Pareto experiment `{cfg.name}`", points, minutes)
    if missing:
        md += f"\nNot finished, left out: {', '.join(missing)}.\n"
    payload = {"name": cfg.name, "taus": cfg.taus, "seeds": cfg.seeds, "results": results, "points": points}
    for name, text in ((f"{stem}.md", md), (f"{stem}.json", json.dumps(payload, indent=2) + "\n")):
        atomic_write(out / name, text)
    plot(points, out / f"{stem}.png", f"quality vs inference compute: {cfg.name}")
    log("\n" + md)
    log(f"wrote {out / (stem + '.md')}, {out / (stem + '.json')}, {out / (stem + '.png')} ({minutes:.1f} min)")
    return payload

"""The experiment's report: one point per (run, tau) averaged over seeds, the Pareto frontier of
validation loss against inference FLOPs per token, and the markdown tables; the plot of the same
points is :mod:`ponderlm.experiments.figures`."""

from __future__ import annotations

import math
from typing import Any

from ponderlm.eval.stats import ci95, mean_std


# ------------------------------------------------------------------ points
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (x) and loss (y), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _group(results: list[dict]) -> dict[tuple[str, float, str | None], list[tuple[dict, dict]]]:
    """(run, tau, ablation label or None) -> the (run result, evaluation row) of each seed."""
    groups: dict[tuple[str, float, str | None], list[tuple[dict, dict]]] = {}
    for r in results:
        for e in r["evals"]:
            groups.setdefault((r["run"], e["tau"], None), []).append((r, e))
        for a in r.get("ablations", []):
            label = f"fixed d={a['depth']}" if a["policy"] == "fixed" else a["policy"]
            groups.setdefault((r["run"], a["tau"], label), []).append((r, a))
    return groups


def _answer_classes(classes: dict) -> list[str]:
    """The ``answer-<d>`` classes by d."""
    return sorted((c for c in classes if c.startswith("answer-")), key=lambda c: int(c.split("-")[1]))


def _class_metrics(rows: list[dict]) -> dict[str, Any]:
    """Per-class metrics of one point on a labelled dataset, over its seeds' rows: accuracy and loss
    per class, the answer classes pooled, the hardest answer class, depth per class and the
    Spearman correlation of depth with d."""
    names = list(rows[0]["classes"])
    answers = [c for c in _answer_classes(rows[0]["classes"]) if rows[0]["classes"][c]["tokens"]]
    out: dict[str, Any] = {"class_acc": {}, "class_acc_std": {}, "class_loss": {}, "class_depth": {}}
    for c in names:
        if rows[0]["classes"][c]["tokens"]:
            out["class_acc"][c], out["class_acc_std"][c] = mean_std([r["classes"][c]["acc"] for r in rows])
            out["class_loss"][c] = mean_std([r["classes"][c]["loss"] for r in rows])[0]
            out["class_depth"][c] = mean_std([r["classes"][c]["mean_depth"] for r in rows])[0]
    if answers:
        pooled = [sum(r["classes"][c]["acc"] * r["classes"][c]["tokens"] for c in answers)
                  / sum(r["classes"][c]["tokens"] for c in answers) for r in rows]  # fmt: skip
        out["answer_acc"], out["answer_acc_std"] = mean_std(pooled)
        out["answer_acc_ci95"] = ci95(pooled)
        out["answer_acc_seeds"] = pooled  # in the order of the point's "seed_list"
        out["hardest_acc_seeds"] = hardest = [r["classes"][answers[-1]]["acc"] for r in rows]
        out["hardest"] = answers[-1]
        out["hardest_acc"], out["hardest_acc_std"] = out["class_acc"][answers[-1]], out["class_acc_std"][answers[-1]]
        out["hardest_acc_ci95"] = ci95(hardest)
    pooled_depth = [r["difficulty"]["mean_depth"]["answer"] for r in rows]
    out["answer_depth"] = None if None in pooled_depth else mean_std(pooled_depth)[0]
    rho = [r["difficulty"]["spearman_depth_d"] for r in rows if r["difficulty"]["spearman_depth_d"] is not None]
    out["spearman_depth_d"] = mean_std(rho)[0] if rho else None
    return out


def _point(run: str, tau: float, ablation: str | None, items: list[tuple[dict, dict]]) -> dict[str, Any]:
    """One point of the report: the seeds' mean (and sample std) of the loss, mean depth and cost
    (and of the per-class accuracies on a labelled dataset)."""
    losses = [e["loss"] for _, e in items]
    mean, std = mean_std(losses)
    r0, e0 = items[0]
    p = {
        "run": run if ablation is None else f"{run} [{ablation}]",
        "ablation": ablation,
        "method": r0["method"],
        "K": r0["K"],
        "penalty_weight": r0["penalty_weight"],
        # tau is a knob of router models only (cached evaluations from before "router" existed: penalty_weight)
        "tau": tau if r0.get("router", r0["penalty_weight"] is not None) and tau is not None else None,
        "seeds": len(items),
        "seed_list": [r.get("seed") for r, _ in items],
        "loss": mean,
        "loss_std": std,
        "loss_ci95": ci95(losses),  # half-width of the t interval over seeds; None for one seed
        "loss_seeds": losses,  # in the order of "seed_list"
        "ppl": math.exp(mean),
        "mean_depth": sum(e["mean_depth"] for _, e in items) / len(items),
        "flops_per_token": sum(e["flops_per_token"] for _, e in items) / len(items),
    }
    for key in ("params", "tokens", "epoch_fraction", "val_windows", "val_tokens", "val_split_tokens"):
        if key in r0:
            p[key] = r0[key]
    if "splits" in e0:  # the test splits, scored at the same tau
        p["splits"] = {}
        for split in e0["splits"]:
            vals = [e["splits"][split]["loss"] for _, e in items]
            m, sd = mean_std(vals)
            p["splits"][split] = {"loss": m, "loss_std": sd, "loss_ci95": ci95(vals), "ppl": math.exp(m),
                                  "loss_seeds": vals}  # fmt: skip
            p[f"{split}_loss"], p[f"{split}_loss_std"] = m, sd  # flat, for the plot's panel
    if "zeroshot_avg" in e0:
        p["zeroshot_avg"] = sum(e["zeroshot_avg"] for _, e in items) / len(items)
    if "classes" in e0:
        p.update(_class_metrics([e for _, e in items]))
    return p


# the frontiers the report marks: (point flag, quality key, lower is better)
FRONTIERS = (("pareto", "loss", True), ("pareto_answer", "answer_acc", False), ("pareto_hardest", "hardest_acc", False))


def frontiers(points: list[dict]) -> tuple[tuple[str, str, bool], ...]:
    """FRONTIERS and one per test split: ``pareto_<split>``, of that split's loss."""
    return FRONTIERS + tuple((f"pareto_{s}", f"{s}_loss", True) for s in reported_splits(points))


def collect_points(results: list[dict]) -> list[dict]:
    """One point per (run, tau), averaged over seeds: cost, loss (mean, std) and depth; the
    frontier of loss against cost (``pareto``) and, on a labelled dataset, of answer accuracy
    (``pareto_answer``, all answer classes pooled; ``pareto_hardest``, the hardest class)."""
    points = [_point(run, tau, ablation, items) for (run, tau, ablation), items in _group(results).items()]
    # the frontier is over trained configurations; ablations are diagnostics of one of them
    main = [i for i, p in enumerate(points) if p["ablation"] is None]
    for flag, key, lower in frontiers(points):
        have = [i for i in main if key in points[i]]
        if not have:
            continue
        sign = 1.0 if lower else -1.0
        front = {have[j] for j in pareto_front([(points[i]["flops_per_token"], sign * points[i][key]) for i in have])}
        for i, p in enumerate(points):
            if key in p:
                p[flag] = i in front
    return points


# ------------------------------------------------------------------ markdown
def _opt(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _tau(p: dict) -> str:
    return "" if p["tau"] is None else f"{p['tau']:g}"


def _std(p: dict, v: float | None, digits: int = 3) -> str:
    """A standard deviation over the point's seeds; none (an empty cell) for a single seed."""
    return _opt(v, digits) if p["seeds"] > 1 else ""


def reported_splits(points: list[dict]) -> list[str]:
    """The test splits the points are scored on (those of the first point that has any)."""
    return list(next((p["splits"] for p in points if "splits" in p), {}))


def markdown(title: str, points: list[dict], minutes: float | None = None,
             references: list[str] | None = None) -> str:  # fmt: skip
    """The report's tables: every point by cost (with the frontier), the runs' training tokens,
    each point against each of the ``references`` runs (default: the run named vanilla, if any),
    the per-seed losses, and on a labelled dataset the per-class accuracies."""
    splits = reported_splits(points)
    zeroshot = any("zeroshot_avg" in p for p in points)
    lines = [f"# {title}", ""]
    if minutes is not None:
        lines += [f"This invocation took {minutes:.1f} min; runs and evaluations it reused from earlier "
                  "invocations are not in that time.", ""]  # fmt: skip
    lines += [
        "Validation loss in the hard-pruned inference computation (Jacobi passes until the latents settle:",
        "the recurrence `generate` runs, to 1e-4); cost is inference FLOPs per token at the realised depths.",
        "`*` marks the Pareto frontier (no other point has both lower cost and lower loss); rows with",
        "[brackets] are inference-time ablations of a PonderLM-3 run, not on the frontier by design.",
        "",
        "`± std` is the seeds' standard deviation, `± 95%` the half-width of the t-distribution interval of",
        "the mean over seeds (two differences are resolved when their intervals do not overlap); both are",
        "left empty for a single seed.",
    ]
    lines += _validation_sentence(points)
    if splits:
        lines += ["Test splits (" + ", ".join(splits) + ") are scored in the same computation at the same tau;",
                  "their losses are per token of this dataset's tokenizer."]  # fmt: skip
    head = ["run", "method", "K", "λ", "tau", "seeds", "val loss", "± std", "± 95%", "ppl", "mean depth",
            "MFLOPs/token", "frontier"]  # fmt: skip
    for split in splits:
        head += [f"{split} loss", "± 95%", f"{split} ppl"]
    if zeroshot:
        head.append("zero-shot avg")
    lines += ["", "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * 10 + ":---:|" + "---:|" * (len(head) - 13)]
    for p in sorted(points, key=lambda q: q["flops_per_token"]):
        cells = [p["run"], p["method"], str(p["K"]), "" if p["penalty_weight"] is None else f"{p['penalty_weight']:g}",
                 _tau(p), str(p["seeds"]), f"{p['loss']:.4f}",
                 _std(p, p["loss_std"], 4), _opt(p.get("loss_ci95"), 4), f"{p['ppl']:.2f}", f"{p['mean_depth']:.2f}",
                 f"{p['flops_per_token'] / 1e6:.3f}", "*" if p.get("pareto") else ""]  # fmt: skip
        for split in splits:
            t = p.get("splits", {}).get(split)
            cells += ["", "", ""] if t is None else [f"{t['loss']:.4f}", _opt(t["loss_ci95"], 4), f"{t['ppl']:.2f}"]
        if zeroshot:
            cells.append(_opt(p.get("zeroshot_avg"), 4))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_runs_table(points)]
    for reference in references or ["vanilla"]:
        ref = next((p for p in points if p["run"] == reference and p["ablation"] is None), None)
        if ref is not None:
            lines += ["", *_versus_table(points, ref, splits)]
    if any(p["seeds"] > 1 for p in points):
        lines += ["", *_loss_seed_table(points)]
    if any("answer_acc" in p for p in points):
        lines += ["", *_class_table(points), "", *_seed_table(points)]
    return "\n".join(lines) + "\n"


def _validation_sentence(points: list[dict]) -> list[str]:
    """What the validation losses are over: windows and scored tokens, of how many in the split
    (evaluations saved before this was recorded: nothing is said)."""
    sizes = {(p["val_windows"], p["val_tokens"], p.get("val_split_tokens")) for p in points if "val_windows" in p}
    if len(sizes) != 1:
        return []
    windows, tokens, split = sizes.pop()
    of = f" of the {split:,} in the validation split" if split else ""
    return [f"Validation: the first {windows} windows of the context, {tokens:,} scored tokens{of} "
            f"(`ponderlm eval --ppl-windows {windows}` scores the same)."]  # fmt: skip


def _runs_table(points: list[dict]) -> list[str]:
    """What each trained configuration is: parameters, seeds and training tokens per seed."""
    seen: dict[str, dict] = {}
    for p in points:
        if p["ablation"] is None:
            seen.setdefault(p["run"], p)
    lines = ["Training of each run (per seed).", "", "| run | params | seeds | tokens | epochs |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for run, p in seen.items():
        lines.append(f"| {run} | {p.get('params', 0):,} | {p['seeds']} | {p.get('tokens', 0):,} | "
                     f"{_opt(p.get('epoch_fraction'), 4)} |")  # fmt: skip
    return lines


def _verdict(a: dict, b: dict) -> str:
    """Whether a's loss is resolved against b's: both over several seeds and 95% intervals apart."""
    if a.get("loss_ci95") is None or b.get("loss_ci95") is None:
        return "one seed"
    lo_a, hi_a = a["loss"] - a["loss_ci95"], a["loss"] + a["loss_ci95"]
    lo_b, hi_b = b["loss"] - b["loss_ci95"], b["loss"] + b["loss_ci95"]
    return "lower" if hi_a < lo_b else "higher" if lo_a > hi_b else "overlap"


def paired_difference(a_seeds: list, a: list[float], b_seeds: list, b: list[float]) -> tuple[float, float, int] | None:
    """Mean of the per-seed differences a - b over the seeds both have, the half-width of its 95%
    t-interval and the number of shared seeds; None for fewer than two. Runs with the same seed
    train on the same batches in the same order (the trainer's data is a function of seed and step),
    so these differences are paired: the seed-to-seed spread both share cancels."""
    at = {s: i for i, s in enumerate(b_seeds) if s is not None}
    diffs = [x - b[at[s]] for s, x in zip(a_seeds, a, strict=True) if s in at]
    if len(diffs) < 2:
        return None
    return mean_std(diffs)[0], ci95(diffs), len(diffs)


def _paired_cells(a_seeds: list, a: list[float], b_seeds: list, b: list[float]) -> list[str]:
    """The paired difference ± its 95% half-width (shared seeds) and whether the interval excludes 0."""
    d = paired_difference(a_seeds, a, b_seeds, b)
    if d is None:
        return ["", "< 2 shared seeds"]
    m, h, n = d
    return [f"{m:+.4f} ± {h:.4f} ({n})", "lower" if m + h < 0 else "higher" if m - h > 0 else "overlap"]


def _versus_table(points: list[dict], ref: dict, splits: list[str]) -> list[str]:
    """Each trained configuration against the reference run: the difference of mean losses and
    whether the 95% intervals over seeds separate them; and the paired difference over the seeds
    both share, with whether its interval excludes zero."""
    head = ["run", "tau", "seeds", "MFLOPs/token", "Δ val loss", "resolved", "paired Δ ± 95% (n)", "paired"]
    for split in splits:
        head += [f"Δ {split} loss", "resolved", "paired Δ ± 95% (n)", "paired"]
    lines = [f"Against `{ref['run']}` ({ref['seeds']} seed(s)): Δ = mean loss minus its mean loss (negative is "
             "better); `lower`/`higher` only where the two 95% intervals do not overlap, `overlap` where they do, "
             "`one seed` where either side has no interval. Paired: runs with the same seed train on the same "
             "batches in the same order, so the per-seed differences over the n seeds both have are paired; "
             "`lower`/`higher` where their 95% t-interval excludes zero (less conservative than `resolved`, "
             "which ignores the pairing).",
             "", "| " + " | ".join(head) + " |",
             "|---|---:|---:|---:|" + "---:|:---:|---:|:---:|" * (1 + len(splits))]  # fmt: skip
    for p in sorted((q for q in points if q["ablation"] is None and q is not ref), key=lambda q: q["flops_per_token"]):
        cells = [p["run"], _tau(p), str(p["seeds"]), f"{p['flops_per_token'] / 1e6:.3f}",
                 f"{p['loss'] - ref['loss']:+.4f}", _verdict(p, ref),
                 *_paired_cells(p["seed_list"], p["loss_seeds"], ref["seed_list"], ref["loss_seeds"])]  # fmt: skip
        for split in splits:
            a, b = p.get("splits", {}).get(split), ref.get("splits", {}).get(split)
            cells += (["", "", "", ""] if a is None or b is None else
                      [f"{a['loss'] - b['loss']:+.4f}", _verdict(a, b),
                       *_paired_cells(p["seed_list"], a["loss_seeds"], ref["seed_list"], b["loss_seeds"])])  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _per_seed_table(ps: list[dict], title: str, cell) -> list[str]:
    """A row per point of ``ps`` (by cost), a column per seed: ``cell(point, i)`` formats the
    point's i-th seed, in the order of its "seed_list". When seeds disagree, the mean hides it."""
    ps = sorted(ps, key=lambda q: q["flops_per_token"])
    seeds = sorted({s for p in ps for s in p["seed_list"] if s is not None})
    lines = [
        title,
        "",
        "| run | tau | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---:|" + "---:|" * len(seeds),
    ]
    for p in ps:
        at = {s: i for i, s in enumerate(p["seed_list"])}
        cells = [cell(p, at[s]) if s in at else "" for s in seeds]
        lines.append(f"| {p['run']} | {_tau(p)} | " + " | ".join(cells) + " |")
    return lines


def _loss_seed_table(points: list[dict]) -> list[str]:
    """Validation loss of every seed of the trained configurations."""
    return _per_seed_table([p for p in points if p["ablation"] is None], "Per seed: validation loss.",
                           lambda p, i: f"{p['loss_seeds'][i]:.4f}")  # fmt: skip


def _seed_table(points: list[dict]) -> list[str]:
    """Answer accuracy of every seed of the trained configurations (labelled datasets)."""
    ps = [p for p in points if "answer_acc_seeds" in p and p["ablation"] is None]
    title = f"Per seed: answer accuracy (all answer classes) / {ps[0]['hardest']} accuracy."
    return _per_seed_table(ps, title, lambda p, i: f"{p['answer_acc_seeds'][i]:.3f} / {p['hardest_acc_seeds'][i]:.3f}")


def _class_table(points: list[dict]) -> list[str]:
    """Accuracy per class of the predicted token (labelled datasets): the answers pooled and the
    hardest class with their seed std, each class, the loss on free and syntax tokens, depth per
    class and the Spearman correlation of depth with the class's d."""
    ps = sorted((p for p in points if "answer_acc" in p), key=lambda q: q["flops_per_token"])
    answers = _answer_classes({c: None for p in ps for c in p["class_acc"]})
    hardest = ps[0]["hardest"]
    head = ["run", "tau", "seeds", "MFLOPs/token", "answer acc", "± std", "± 95%", f"{hardest} acc", "± std", "± 95%",
            *(f"{c} acc" for c in answers), "free loss", "syntax loss", "depth answer", "depth free", "depth syntax",
            "Spearman(depth, d)", "frontier (all / hardest)"]  # fmt: skip
    lines = [
        "Accuracy per class of the predicted token (the metrics at position t belong to token t + 1; "
        "docs/SYNTHETIC.md): mean over seeds, ± the seeds' standard deviation. The frontier columns mark",
        "the points no other trained configuration beats on both cost and answer accuracy (all answer "
        f"classes pooled / {hardest} alone).",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---:|---:|" + "---:|" * (len(head) - 4) + ":---:|",
    ]
    for p in ps:
        depth = p["class_depth"]
        cells = [p["run"], _tau(p), str(p["seeds"]), _opt(p["flops_per_token"] / 1e6),
                 _opt(p["answer_acc"]), _std(p, p["answer_acc_std"]), _opt(p.get("answer_acc_ci95")),
                 _opt(p["hardest_acc"]), _std(p, p["hardest_acc_std"]), _opt(p.get("hardest_acc_ci95")),
                 *(_opt(p["class_acc"].get(c)) for c in answers), _opt(p["class_loss"].get("free")),
                 _opt(p["class_loss"].get("syntax")),
                 _opt(p["answer_depth"], 2),
                 _opt(depth.get("free"), 2), _opt(depth.get("syntax"), 2), _opt(p["spearman_depth_d"], 2),
                 f"{'*' if p.get('pareto_answer') else ''} / {'*' if p.get('pareto_hardest') else ''}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines

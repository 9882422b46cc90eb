"""The experiment's report: one point per (run, tau) averaged over seeds, the Pareto frontier of
validation loss against inference FLOPs per token, a markdown table and a plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MARKERS = {"vanilla": "o", "pause": "P", "loop": "D", "ponderlm1": "v", "ponderlm2": "s", "ponderlm3": "^"}
ABLATION_MARKERS = {"random": "x", "entropy": "+"}


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


def _point(run: str, tau: float, ablation: str | None, items: list[tuple[dict, dict]]) -> dict[str, Any]:
    """One point of the report: the seeds' mean (and sample std) of the loss, mean depth and cost."""
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
        # tau is a knob of router models only (cached evaluations from before "router" existed: penalty_weight)
        "tau": tau if r0.get("router", r0["penalty_weight"] is not None) and tau is not None else None,
        "seeds": len(items),
        "loss": mean,
        "loss_std": std,
        "ppl": math.exp(mean),
        "mean_depth": sum(e["mean_depth"] for _, e in items) / len(items),
        "flops_per_token": sum(e["flops_per_token"] for _, e in items) / len(items),
    }
    if "zeroshot_avg" in e0:
        p["zeroshot_avg"] = sum(e["zeroshot_avg"] for _, e in items) / len(items)
    return p


def collect_points(results: list[dict]) -> list[dict]:
    """One point per (run, tau), averaged over seeds: cost, loss (mean, std) and depth."""
    points = [_point(run, tau, ablation, items) for (run, tau, ablation), items in _group(results).items()]
    # the frontier is over trained configurations; ablations are diagnostics of one of them
    main = [i for i, p in enumerate(points) if p["ablation"] is None]
    front = {main[j] for j in pareto_front([(points[i]["flops_per_token"], points[i]["loss"]) for i in main])}
    for i, p in enumerate(points):
        p["pareto"] = i in front
    return points


# ------------------------------------------------------------------ markdown
def markdown(title: str, points: list[dict], minutes: float | None = None) -> str:
    lines = [f"# {title}", ""]
    if minutes is not None:
        lines += [f"{minutes:.1f} min in all.", ""]
    lines += [
        "Validation loss in the hard-pruned inference computation (Jacobi passes until the latents settle:",
        "the recurrence `generate` runs, to 1e-4); cost is inference FLOPs per token at the realised depths.",
        "`*` marks the Pareto frontier (no other point has both lower cost and lower loss); rows with",
        "[brackets] are inference-time ablations of a PonderLM-3 run, not on the frontier by design.",
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


# ------------------------------------------------------------------ plot
def _series(points: list[dict], key: str) -> dict[str, list[dict]]:
    """The points that have ``key``, by plotted line: one per run, one per run and ablation
    policy (every fixed depth on one line)."""
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
    return runs


def _draw_series(ax, run: str, ps: list[dict], key: str, colour) -> None:
    """One line of a panel, by cost: a run's tau sweep, or an ablation of it (dotted)."""
    ps = sorted(ps, key=lambda q: q["flops_per_token"])
    xs = [q["flops_per_token"] / 1e6 for q in ps]
    ys = [q[key] for q in ps]
    abl = ps[0]["ablation"]
    if abl is None:
        ax.plot(xs, ys, marker=MARKERS.get(ps[0]["method"], "o"), color=colour, alpha=0.85, label=run)
    else:
        m = ABLATION_MARKERS.get(abl, "|")
        ax.plot(xs, ys, marker=m, color=colour, alpha=0.6, ls=":", lw=0.8, ms=7, label=run)
    if key == "loss" and any(q["loss_std"] > 0 for q in ps):
        ax.errorbar(xs, ys, yerr=[q["loss_std"] for q in ps], fmt="none", color=colour, alpha=0.5)
    for q, x, y in zip(ps, xs, ys, strict=True):
        if q["tau"] is not None:
            ax.annotate(f"{q['tau']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)


def _draw_frontier(ax, points: list[dict]) -> None:
    fr = sorted((p for p in points if p["pareto"]), key=lambda q: q["flops_per_token"])
    fx, fy = [q["flops_per_token"] / 1e6 for q in fr], [q["loss"] for q in fr]
    ax.step(fx, fy, where="post", color="black", lw=1, ls="--")
    ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="black", label="Pareto frontier")


def _draw_panel(ax, points: list[dict], key: str, label: str, palette) -> None:
    """Quality ``key`` against inference MFLOPs per token: a line per run (a run and its
    ablations share a colour), and the frontier on the loss panel."""
    colours: dict[str, Any] = {}
    for run, ps in _series(points, key).items():
        base = run.rsplit(" [", 1)[0]
        _draw_series(ax, run, ps, key, colours.setdefault(base, palette[len(colours) % len(palette)]))
    if key == "loss":
        _draw_frontier(ax, points)
    ax.set_xlabel("inference MFLOPs per token")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def plot(points: list[dict], path: Path, title: str) -> None:
    """Validation loss (and zero-shot average accuracy, when measured) against inference cost,
    written to ``path`` through a hidden temporary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_zs = any("zeroshot_avg" in p for p in points)
    fig, axes = plt.subplots(1, 2 if has_zs else 1, figsize=(12 if has_zs else 7, 4.5), squeeze=False)
    panels = [("loss", "validation loss (hard mode)")]
    if has_zs:
        panels.append(("zeroshot_avg", "zero-shot average accuracy"))
    palette = plt.get_cmap("tab10").colors
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        _draw_panel(ax, points, key, label, palette)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)

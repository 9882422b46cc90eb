"""The experiment's figure: quality against inference FLOPs per token, a panel per quality (the
validation loss, each test split, the zero-shot average, answer accuracy), one line per run, the
Pareto frontier marked and the tau of each PonderLM-3 point labelled without overlap. The points
and frontiers it draws are :mod:`ponderlm.experiments.report`'s."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from ponderlm.experiments.report import frontiers, reported_splits

MARKERS = {"vanilla": "o", "pause": "P", "loop": "D", "ponderlm1": "v", "ponderlm2": "s", "ponderlm3": "^"}
ABLATION_MARKERS = {"random": "x", "entropy": "+"}


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


Polyline = list[tuple[float, float]]  # a drawn line's vertices, in data coordinates


TauLabel = tuple[str, float, float, Any]  # text, x, y, colour


def _draw_series(ax, run: str, ps: list[dict], key: str, colour) -> tuple[list[TauLabel], Polyline]:
    """One line of a panel, by cost: a run's tau sweep, or an ablation of it (dotted). Returns the
    tau labels of a run's points (text, x, y, colour), placed once the axes are final, and the line."""
    ps = sorted(ps, key=lambda q: q["flops_per_token"])
    xs = [q["flops_per_token"] / 1e6 for q in ps]
    ys = [q[key] for q in ps]
    abl = ps[0]["ablation"]
    if abl is None:
        ax.plot(xs, ys, marker=MARKERS.get(ps[0]["method"], "o"), color=colour, alpha=0.85, label=run)
    else:
        m = ABLATION_MARKERS.get(abl, "|")
        ax.plot(xs, ys, marker=m, color=colour, alpha=0.6, ls=":", lw=0.8, ms=7, label=run)
    std = f"{key}_std"
    if any(q.get(std, 0) > 0 for q in ps):
        ax.errorbar(xs, ys, yerr=[q.get(std, 0.0) for q in ps], fmt="none", color=colour, alpha=0.5, capsize=2)
    line = list(zip(xs, ys, strict=True))
    if abl is not None:
        return [], line
    return [(f"τ={q['tau']:g}", x, y, colour) for q, x, y in zip(ps, xs, ys, strict=True) if q["tau"] is not None], line


TAU_FONT = 6  # points
RING_AREA = 140  # points^2: the scatter size of the frontier's rings
# half-widths in points of what a tau label must not cover: a line marker (matplotlib's default
# size, 6) and a frontier ring, each with half a point of edge
MARKER_HALF, RING_HALF = 6 / 2 + 0.5, math.sqrt(RING_AREA) / 2 + 0.5


def label_offsets(anchors: list[tuple[float, float]], sizes: list[tuple[float, float]],
                  markers: list[tuple[float, float, float]],
                  bounds: tuple[float, float, float, float] | None = None) -> list[tuple[float, float]]:  # fmt: skip
    """Where to put text labels next to their points so that they cover neither each other nor a
    marker: for each label (left to right), the first of a few positions around its anchor that is
    free, else the one that overlaps least. Everything is in points: anchors (x, y), sizes (w, h),
    markers (x, y, half-width), ``bounds`` (x0, y0, x1, y1) the axes, which a label should stay
    inside. Returns the offset (dx, dy) of each label's lower-left corner."""

    def overlap(a, b) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    marks = [(x - r, y - r, x + r, y + r) for x, y, r in markers]
    placed: list[tuple[float, float, float, float]] = []
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(anchors)
    for i in sorted(range(len(anchors)), key=lambda j: anchors[j]):
        (x, y), (w, h) = anchors[i], sizes[i]
        # clear of the label's own marker (the largest drawn at its anchor)
        g = 1.0 + max([r for mx, my, r in markers if abs(mx - x) < 0.5 and abs(my - y) < 0.5], default=MARKER_HALF)
        candidates = [(g, g), (g, -h - g), (-w - g, g), (-w - g, -h - g), (-w / 2, g + 2), (-w / 2, -h - g - 2),
                      (g, h + g + 2), (g, -2 * h - g - 2), (-w - g, h + g + 2), (-w - g, -2 * h - g - 2)]  # fmt: skip
        best, best_cost = candidates[0], math.inf
        for dx, dy in candidates:
            box = (x + dx, y + dy, x + dx + w, y + dy + h)
            cost = sum(overlap(box, b) for b in placed) + sum(overlap(box, m) for m in marks)
            if bounds is not None:  # the part outside the axes counts as covered
                cost += w * h - overlap(box, bounds)
            if cost < best_cost:
                best, best_cost = (dx, dy), cost
            if cost == 0.0:
                break
        out[i] = best
        placed.append((x + best[0], y + best[1], x + best[0] + w, y + best[1] + h))
    return out


LINE_STEP, LINE_HALF = 2.0, 1.0  # points: a drawn line is kept clear of labels as squares this far apart


def _line_marks(pt, lines: list[Polyline]) -> list[tuple[float, float, float]]:
    """The drawn lines as :func:`label_offsets` markers: squares of half-width LINE_HALF every
    LINE_STEP points along each segment (``pt`` maps data to points)."""
    marks = []
    for line in lines:
        ps = [pt(x, y) for x, y in line]
        for (x0, y0), (x1, y1) in itertools.pairwise(ps):
            n = max(1, math.ceil(math.hypot(x1 - x0, y1 - y0) / LINE_STEP))
            marks += [(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n, LINE_HALF) for i in range(n + 1)]
    return marks


def _place_tau_labels(ax, labels: list[TauLabel], points: list[tuple[float, ...]],
                      lines: list[Polyline] = ()) -> None:  # fmt: skip
    """Annotate PonderLM-3's tau points without overlap (:func:`label_offsets`), once the axes'
    scales and limits are final; ``points`` are the panel's markers (x, y, half-width in points),
    ``lines`` the lines drawn on it (the runs' and the frontier's), which labels keep clear of."""
    if not labels:
        return
    ax.get_xlim(), ax.get_ylim()  # settle autoscaling before mapping data to points
    scale = 72.0 / ax.figure.dpi

    def pt(x: float, y: float) -> tuple[float, float]:
        px, py = ax.transData.transform((x, y))
        return px * scale, py * scale

    x0, y0 = ax.transAxes.transform((0.0, 0.0)) * scale
    x1, y1 = ax.transAxes.transform((1.0, 1.0)) * scale
    sizes = [(0.6 * TAU_FONT * len(text), TAU_FONT) for text, *_ in labels]
    markers = [(*pt(x, y), r) for x, y, r in points] + _line_marks(pt, list(lines))
    offsets = label_offsets([pt(x, y) for _, x, y, _ in labels], sizes, markers, bounds=(x0, y0, x1, y1))
    for (text, x, y, colour), (dx, dy) in zip(labels, offsets, strict=True):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=TAU_FONT, color=colour,
                    ha="left", va="bottom")  # fmt: skip


def _draw_frontier(ax, points: list[dict], key: str, flag: str) -> Polyline:
    """The frontier as a dashed step line through rings; returns the step line's vertices."""
    fr = sorted((p for p in points if p.get(flag)), key=lambda q: q["flops_per_token"])
    fx, fy = [q["flops_per_token"] / 1e6 for q in fr], [q[key] for q in fr]
    ax.step(fx, fy, where="post", color="black", lw=1, ls="--")
    ax.scatter(fx, fy, s=RING_AREA, facecolors="none", edgecolors="black", label="Pareto frontier")
    steps = [(fx[0], fy[0])] if fr else []
    for x, y, prev in zip(fx[1:], fy[1:], fy, strict=False):  # where="post": across at the last height, then down
        steps += [(x, prev), (x, y)]
    return steps


def x_limits(xs: list[float]) -> tuple[float, float]:
    """The x axis (log scale) of a panel: every point inside, with a margin of 6% of the range in
    log space (at least 4%) on each side."""
    lo, hi = min(xs), max(xs)
    pad = max((hi / lo) ** 0.06, 1.04)
    return lo / pad, hi * pad


def log_ticks(lo: float, hi: float) -> list[float]:
    """At least three round tick values inside [lo, hi], the limits of a log axis: 1, 2 and 5 times
    a power of ten over more than a decade and a half, with 1.5, 3 and 7 over less; over a range
    too narrow for three of those, evenly spaced round numbers (1.3, 1.4, ...)."""
    mantissas = (1, 2, 5) if hi / lo > 30 else (1, 1.5, 2, 3, 5, 7)
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in mantissas]  # fmt: skip
    inside = [t for t in ticks if lo <= t <= hi]
    if len(inside) >= 3:
        return inside
    from matplotlib.ticker import MaxNLocator

    return [float(f"{t:.6g}") for t in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
            if lo <= t <= hi]  # fmt: skip


def _draw_panel(ax, points: list[dict], key: str, label: str, colours: dict[str, Any], frontier: bool):
    """Quality ``key`` against inference MFLOPs per token: a line per run (a run and its
    ablations share a colour, the same in every panel) and, with ``frontier``, the frontier; every
    point lies inside the axes. Returns the function that writes the tau labels, to be called once
    the figure's layout is final."""
    labels, lines = [], []
    for run, ps in _series(points, key).items():
        run_labels, line = _draw_series(ax, run, ps, key, colours[run.rsplit(" [", 1)[0]])
        labels += run_labels
        lines.append(line)
    flags = [flag for flag, k, _ in frontiers(points) if k == key] if frontier else []
    for flag in flags:
        lines.append(_draw_frontier(ax, points, key, flag))
    ax.set_xscale("log")
    xs = [p["flops_per_token"] / 1e6 for p in points if key in p]
    if xs:
        import matplotlib.ticker as ticker  # matplotlib is imported, Agg selected, by plot()

        lo, hi = x_limits(xs)
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(ticker.FixedLocator(log_ticks(lo, hi)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.margins(y=0.12)  # room for the tau labels of the highest and lowest points
    ax.set_xlabel("inference MFLOPs per token (log scale)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    markers = [(p["flops_per_token"] / 1e6, p[key], RING_HALF if any(p.get(f) for f in flags) else MARKER_HALF)
               for p in points if key in p]  # fmt: skip
    return lambda: _place_tau_labels(ax, labels, markers, lines)


def figure(points: list[dict], title: str):
    """The report's figure (matplotlib, Agg): quality against inference cost, validation loss, the
    loss on each test split, the zero-shot average (when measured) and answer accuracy (on a
    labelled dataset), each a panel of the trained configurations only, so its axes fit them; the
    PonderLM-3 ablations, which can be nats away, get a panel of their own beside their runs. The
    legend sits outside. Close it with ``matplotlib.pyplot.close``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [p for p in points if p["ablation"] is None]
    ablations = [p for p in points if p["ablation"] is not None]
    panels = [("loss", "validation loss (hard mode)", main, True)]
    panels += [(f"{split}_loss", f"{split} loss (hard mode)", main, True) for split in reported_splits(main)]
    if any("zeroshot_avg" in p for p in main):
        panels.append(("zeroshot_avg", "zero-shot average accuracy", main, False))
    hardest = next((p["hardest"] for p in main if "hardest" in p), None)
    if hardest is not None:
        panels += [("answer_acc", "answer accuracy (all answer classes)", main, True),
                   ("hardest_acc", f"{hardest} accuracy", main, True)]  # fmt: skip
    if ablations:
        ablated = {p["run"].rsplit(" [", 1)[0] for p in ablations}
        their_runs = [p for p in main if p["run"] in ablated]
        panels.append(("loss", "validation loss: PonderLM-3 ablations", ablations + their_runs, False))
    # saturated colours first (tab10), then tab20's light ones: every run's marker clearly visible
    palette = plt.get_cmap("tab10").colors + plt.get_cmap("tab20").colors[1::2]
    colours: dict[str, Any] = {}
    for p in points:
        colours.setdefault(p["run"].rsplit(" [", 1)[0], palette[len(colours) % len(palette)])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    place_labels = [_draw_panel(ax, ps, key, label, colours, frontier)
                    for ax, (key, label, ps, frontier) in zip(axes[0], panels, strict=True)]  # fmt: skip
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    fig.legend(list(legend.values()), list(legend), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
               frameon=False)  # fmt: skip
    fig.suptitle(title)
    fig.tight_layout()
    for place in place_labels:
        place()
    return fig


def plot(points: list[dict], path: Path, title: str) -> None:
    """:func:`figure`, written to ``path`` through a hidden temporary."""
    import matplotlib.pyplot as plt

    fig = figure(points, title)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)

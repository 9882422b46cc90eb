"""``ponderlm analyze``: where does a checkpoint ponder? Per-token realised depth in the hard-pruned
inference computation, against the token's loss and the model's predictive entropy.

Writes ``analysis.json`` (every number), ``depth.html`` (a text coloured by depth, with the
statistics as tables; standalone) and ``depth.png`` (the same at a glance). On a dataset with token
labels (``ponderlm data synthetic``) they add the depth per class of the predicted token and show a
validation document with each token's class (docs/SYNTHETIC.md, "Evaluating by class").
"""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from .. import threads
from ..config import ConfigError, check_tau
from ..data import DataError, TokenShards, eval_windows, window_labels
from ..data.tokenizer import EOT, Tokenizer
from ..limits import encode_prefix
from ..loading import checkpoint_dataset, load_model
from ..model import CONVERGED, PonderLM
from ..owned import DirLock
from ..progress import heartbeat
from .head import head_chunks
from .perplexity import class_sums, summarize_classes
from .run import check_results_dir, write_result_files
from .stats import pearson, spearman

FILES = ("analysis.json", "depth.html", "depth.png")
MIN_COUNT = 20  # a token needs this many occurrences to enter the deepest/shallowest tables
TOP = 20  # rows in each of those tables
PNG_TOKENS = 512  # the figure shows at most this many tokens of the text
IGNORE = -1  # target id of a position with nothing to predict (the last token of a text)


@torch.no_grad()
def position_stats(model: PonderLM, x: torch.Tensor, y: torch.Tensor, tau: float) -> dict[str, torch.Tensor]:
    """One hard-mode forward -> per-position statistics, each (B*T,) on the CPU.

    Args: x (B, T) input ids; y (B, T) next-token ids, IGNORE where there is none (loss NaN).
    Returns ids (the input token, long), depth (realised steps, long), loss (-log p(y), float64),
    entropy (of the predictive distribution in nats, float64) and correct (bool: argmax == y).
    """
    out = model(x, mode="hard", tau=tau, with_logits=False, **CONVERGED)  # eval's default computation
    hidden, target = out.hidden.flatten(0, 1), y.flatten().clamp_min(0)  # (B*T, D), (B*T,)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    loss = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
    entropy, correct = torch.empty_like(loss), torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    for s, e, logits in head_chunks(model, hidden):  # a bounded number of (position, vocab) logits at a time
        logp = logits.log_softmax(-1)
        entropy[s:e] = -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)
        loss[s:e] = -logp.gather(-1, target[s:e, None]).squeeze(-1)
        correct[s:e] = logits.argmax(-1) == y.flatten()[s:e]
    loss = loss.masked_fill(y.flatten() == IGNORE, float("nan"))
    return {
        "ids": x.flatten().cpu(),
        "depth": out.depth.round().long().flatten().cpu(),
        "loss": loss.double().cpu(),
        "entropy": entropy.double().cpu(),
        "correct": correct.cpu(),
    }


def collect(model: PonderLM, windows: torch.Tensor, tau: float, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """position_stats over (N, L+1) token windows, in batches: each entry (N*L,)."""
    device = next(model.parameters()).device
    parts = []
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        parts.append(position_stats(model, w[:, :-1], w[:, 1:], tau))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _mean_or_none(total: np.ndarray, count: np.ndarray) -> list[float | None]:
    return [float(t / c) if c else None for t, c in zip(total, count, strict=True)]


def depth_summary(stats: dict[str, torch.Tensor], K: int, tok: Tokenizer) -> dict:
    """Histogram, correlations, per-depth means and the deepest/shallowest frequent tokens."""
    depth, loss, ent = stats["depth"].numpy(), stats["loss"].numpy(), stats["entropy"].numpy()
    ids = stats["ids"].numpy()
    counts = np.bincount(depth, minlength=K + 1)
    n = len(depth)
    res = {
        "tokens": n,
        "depth_counts": counts.tolist(),
        "depth_hist": (counts / n).tolist(),
        "mean_depth": float(depth.mean()),
        "mean_loss": float(loss.mean()),
        "mean_entropy": float(ent.mean()),
        "correlations": {
            "loss": {"pearson": pearson(depth, loss), "spearman": spearman(depth, loss)},
            "entropy": {"pearson": pearson(depth, ent), "spearman": spearman(depth, ent)},
        },
        "mean_loss_per_depth": _mean_or_none(np.bincount(depth, loss, K + 1), counts),
        "mean_entropy_per_depth": _mean_or_none(np.bincount(depth, ent, K + 1), counts),
    }
    n_tok = np.bincount(ids)
    mean_d = np.bincount(ids, depth.astype(np.float64)) / np.maximum(n_tok, 1)
    mean_l = np.bincount(ids, loss) / np.maximum(n_tok, 1)
    frequent = np.flatnonzero(n_tok >= MIN_COUNT)

    def table(order: np.ndarray) -> list[dict]:
        return [
            {
                "token": tok.decode([int(t)]),
                "id": int(t),
                "count": int(n_tok[t]),
                "mean_depth": float(mean_d[t]),
                "mean_loss": float(mean_l[t]),
            }
            for t in frequent[order[:TOP]]
        ]

    # lexsort: last key is primary; ties go to the more frequent token
    res["min_count"] = MIN_COUNT
    res["deepest_tokens"] = table(np.lexsort((-n_tok[frequent], -mean_d[frequent])))
    res["shallowest_tokens"] = table(np.lexsort((-n_tok[frequent], mean_d[frequent])))
    return res


def class_summary(stats: dict[str, torch.Tensor], labels: torch.Tensor, classes: list[str], K: int) -> dict:
    """Per-class depth, loss and accuracy (:func:`~ponderlm.eval.perplexity.summarize_classes`, the
    numbers ``ponderlm eval`` reports) of :func:`collect` over windows labelled by ``labels``
    (N, L+1). Position t predicts token t + 1, so its depth, loss and accuracy count for the class
    of token t + 1."""
    target = labels[:, 1:].flatten()  # (N*L,) the class of what each position predicts
    return summarize_classes(class_sums(target, stats["loss"], stats["correct"], stats["depth"], len(classes), K),
                             classes)  # fmt: skip


def tag(name: str) -> str:
    """A class's short tag under a token: S (syntax), F (free), A<d> (answer-d), else its first letters."""
    if name in ("syntax", "free"):
        return name[0].upper()
    return "A" + name[7:] if name.startswith("answer-") else name[:3]


# ------------------------------------------------------------------ rendering
def depth_colors(K: int) -> list[str]:
    """One light-to-dark hex colour per depth 0..K (black text stays readable on all)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return [to_hex(c) for c in colormaps["YlOrRd"](np.linspace(0.08, 0.7, K + 1))]


def _visible(s: str) -> str:
    """A token's text for HTML: newlines and tabs marked, the characters themselves kept."""
    return s.replace("\t", "→\t").replace("\r", "\\r").replace("\n", "↵\n")


def _png_label(s: str) -> str:
    """A token's text for one cell of the figure: one line, whitespace marked."""
    return s.replace("\t", "→").replace("\r", "\\r").replace("\n", "↵")


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _html_tables(s: dict) -> str:
    esc = html.escape
    c = s["correlations"]
    rows = [
        ("validation tokens", f"{s['tokens']:,}"),
        ("mean depth", _fmt(s["mean_depth"])),
        ("mean loss", _fmt(s["mean_loss"])),
        ("mean entropy", _fmt(s["mean_entropy"])),
        ("depth vs loss: Pearson / Spearman", f"{_fmt(c['loss']['pearson'])} / {_fmt(c['loss']['spearman'])}"),
        ("depth vs entropy: Pearson / Spearman", f"{_fmt(c['entropy']['pearson'])} / {_fmt(c['entropy']['spearman'])}"),
    ]
    out = ["<h2>Validation statistics</h2><table>"]
    out += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows]
    out.append("</table><h3>Per depth</h3><table><tr><th>depth</th><th>tokens</th><th>fraction</th>")
    out.append("<th>mean loss</th><th>mean entropy</th></tr>")
    for d in range(len(s["depth_hist"])):
        out.append(
            f'<tr><td><span class="swatch d{d}">{d}</span></td><td>{s["depth_counts"][d]:,}</td>'
            f"<td>{s['depth_hist'][d]:.4f}</td><td>{_fmt(s['mean_loss_per_depth'][d])}</td>"
            f"<td>{_fmt(s['mean_entropy_per_depth'][d])}</td></tr>"
        )
    out.append("</table>")
    for key, title in (("deepest_tokens", "Deepest"), ("shallowest_tokens", "Shallowest")):
        out.append(f"<h3>{title} tokens (at least {s['min_count']} occurrences)</h3>")
        out.append("<table><tr><th>token</th><th>count</th><th>mean depth</th><th>mean loss</th></tr>")
        out += [
            f"<tr><td><code>{esc(repr(r['token']))}</code></td><td>{r['count']}</td>"
            f"<td>{r['mean_depth']:.3f}</td><td>{r['mean_loss']:.3f}</td></tr>"
            for r in s[key]
        ]
        out.append("</table>")
    if "classes" in s:
        out.append(_html_classes(s))
    return "\n".join(out)


def _html_classes(s: dict) -> str:
    """The per-class table of a labelled dataset and the depth-vs-difficulty numbers."""
    dif = s["difficulty"]
    m = dif["mean_depth"]
    K1 = len(s["depth_hist"])
    out = [
        "<h3>Per class of the predicted token</h3>",
        "<p>The depth, loss and accuracy at position t count for the class of token t+1, the token predicted "
        f"there. Spearman(depth, d) over {dif['answer_tokens']:,} answer-d tokens: {_fmt(dif['spearman_depth_d'])}; "
        f"mean depth on answer / free / syntax tokens: {_fmt(m['answer'])} / {_fmt(m['free'])} / "
        f"{_fmt(m['syntax'])}.</p>",
        "<table><tr><th>class</th><th>tokens</th><th>mean depth</th>"
        + "".join(f'<th><span class="swatch d{d}">depth {d}</span></th>' for d in range(K1))
        + "<th>mean loss</th><th>accuracy</th></tr>",
    ]
    for name, c in s["classes"].items():
        hist = c.get("depth_hist") or [None] * K1
        out.append(
            f"<tr><th>{html.escape(name)}</th><td>{c['tokens']:,}</td><td>{_fmt(c['mean_depth'])}</td>"
            + "".join(f"<td>{_fmt(h)}</td>" for h in hist)
            + f"<td>{_fmt(c['loss'])}</td><td>{_fmt(c['acc'])}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def render_html(text: dict, stats: dict, meta: dict) -> str:
    """A standalone page: the text's tokens coloured by depth (tooltips: depth, loss, entropy); for
    a labelled dataset, the first validation document coloured by the depth spent predicting each
    token, with its class under it."""
    esc = html.escape
    colors = depth_colors(meta["K"])
    css = "\n".join(f".d{d} {{ background: {c}; }}" for d, c in enumerate(colors))
    legend = " ".join(f'<span class="swatch d{d}">depth {d}</span>' for d in range(len(colors)))
    if "predicted" in text:
        css += LABELLED_CSS
        body = _html_predicted(text, legend)
    else:
        body = _html_text(text, legend)
    head = (
        f"method {meta['method']}, K={meta['K']}, tau={meta['tau']:g}; hard-pruned inference computation. "
        f"Checkpoint {meta['checkpoint']}."
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ponderlm depth analysis</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }}
.text {{ font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; line-height: 1.8;
  border: 1px solid #ccc; padding: 1em; }}
.tok {{ border-radius: 2px; }}
.tok:hover {{ outline: 1px solid #000; }}
.swatch {{ padding: 0 0.5em; border: 1px solid #999; font-family: monospace; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
th {{ text-align: left; }}
code {{ white-space: pre; }}
{css}
</style></head><body>
<h1>Per-token ponder depth</h1>
<p>{esc(head)}</p>
{body}
{_html_tables(stats)}
</body></html>
"""


def _html_text(text: dict, legend: str) -> str:
    """The text, each token coloured by the depth its own slot pondered."""
    esc = html.escape
    spans = []
    for t in text["per_token"]:
        title = f"depth {t['depth']} | loss {_fmt(t['loss'])} | entropy {_fmt(t['entropy'])}"
        if t["next"] is not None:
            title += f" | next {t['next']!r}"
        spans.append(f'<span class="tok d{t["depth"]}" title="{esc(title)}">{esc(_visible(t["token"]))}</span>')
    return f"""<p>Text: {esc(text["source"])}, {len(text["per_token"])} tokens, mean depth {text["mean_depth"]:.3f}.
Each token is coloured by the depth its slot pondered; hover for the loss and entropy of the
prediction made there. Legend: {legend}</p>
<div class="text">{"".join(spans)}</div>"""


LABELLED_CSS = """
.cell { display: inline-flex; flex-direction: column; align-items: center; margin: 0 2px 6px 0; line-height: 1.3; }
.ptok { padding: 0 4px; border-radius: 2px; min-width: 1em; text-align: center; }
.ptok.none { outline: 1px dashed #999; }
.cell:hover .ptok { outline: 1px solid #000; }
.tag { font-size: 70%; color: #666; }
.tag.answer { color: #6a3d9a; font-weight: bold; }
"""


def _html_predicted(text: dict, legend: str) -> str:
    """The first validation document: each token coloured by the depth spent predicting it (at
    the previous position), its class's tag under it."""
    esc = html.escape
    cells = []
    for t in text["predicted"]:
        if t["depth"] is None:
            shade, title = "none", "not predicted within the window"
        else:
            shade, title = f"d{t['depth']}", f"predicted at depth {t['depth']} | loss {_fmt(t['loss'])}"
        kind = "answer" if t["class"].startswith("answer-") else "other"
        cells.append(
            f'<span class="cell" title="{esc(t["class"] + " | " + title)}"><span class="ptok {shade}">'
            f'{esc(_png_label(t["token"]))}</span><span class="tag {kind}">{esc(tag(t["class"]))}</span></span>'
        )
    return f"""<p>Text: the first validation document ({len(cells)} tokens, up to its end of text or the window's end).
Each token is coloured by the depth <em>spent predicting it</em>: the depth of the previous position, whose output
is the prediction of this token (the first token is not predicted within the window: no colour). Under each
token, its class: S syntax, F free, A<i>d</i> answer-<i>d</i>. Hover for the loss of the prediction.
Legend: {legend}</p>
<div class="text">{"".join(cells)}</div>"""


def _layout(tokens: list[str], width: int, min_cells: int = 1) -> list[tuple[int, int, int]]:
    """Wrap tokens into lines of ``width`` character cells, breaking after newlines; a token takes
    at least ``min_cells`` cells.

    Returns (row, column, cells) per token.
    """
    out, row, col = [], 0, 0
    for s in tokens:
        n = max(min_cells, min(len(_png_label(s)), width))
        if col and col + n > width:
            row, col = row + 1, 0
        out.append((row, col, n))
        col += n
        if "\n" in s:
            row, col = row + 1, 0
    return out


def render_png(text: dict, stats: dict, meta: dict) -> bytes:
    """Top: the text's tokens coloured by depth (for a labelled dataset: the first validation
    document, coloured by the depth spent predicting each token, its class under it); bottom: depth
    histogram, loss/entropy per depth and, for a labelled dataset, the depths of each class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = depth_colors(meta["K"])
    labelled = "predicted" in text
    toks = (text["predicted"] if labelled else text["per_token"])[:PNG_TOKENS]
    width, fig_w, left, right = 140, 14.0, 0.05, 0.98  # characters per line, inches, margins
    font = (right - left) * fig_w * 72 / width / 0.62  # DejaVu Sans Mono advances 0.6 em per character
    cells = _layout([t["token"] for t in toks], width, min_cells=2 if labelled else 1)
    pitch = 2 if labelled else 1  # a labelled line holds the tokens and, under them, their classes
    n_rows = cells[-1][0] + 1
    top_h, bot_h, gap = n_rows * pitch * font * 1.5 / 72 + 0.1, 3.0, 0.7  # inches
    fig_h = top_h + bot_h + gap + 0.5 + 0.2 * labelled + 0.6  # + title above, labels below
    fig = Figure(figsize=(fig_w, fig_h), dpi=110)
    FigureCanvasAgg(fig)
    n_cols = 3 if "classes" in stats else 2
    gs = fig.add_gridspec(
        2, n_cols, height_ratios=[top_h, bot_h], left=left, right=right, top=1 - (0.5 + 0.2 * labelled) / fig_h,
        bottom=0.6 / fig_h, hspace=gap / ((top_h + bot_h) / 2), wspace=0.15 if n_cols == 2 else 0.4,
    )  # fmt: skip
    ax = fig.add_subplot(gs[0, :])
    ax.set_xlim(0, width)
    ax.set_ylim(n_rows * pitch, 0)
    ax.axis("off")
    if labelled:
        _png_predicted(ax, toks, cells, colors, font)
    else:
        _png_tokens(ax, toks, cells, colors, font)
    ax.set_title(_png_title(text, meta, len(toks)), loc="left")
    _png_histogram(fig.add_subplot(gs[1, 0]), stats, colors)
    _png_per_depth(fig.add_subplot(gs[1, 1]), stats, len(colors))
    if n_cols == 3:
        _png_classes(fig.add_subplot(gs[1, 2]), stats, colors)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _png_title(text: dict, meta: dict, shown_tokens: int) -> str:
    """The text panel's title: what is shown and what its colours mean."""
    if "predicted" in text:
        n = len(text["predicted"])
        whole = text["predicted"][-1]["token"] == EOT  # else the window ends inside the document
        shown = f"first {shown_tokens} of " if shown_tokens < n else ""
        what = "First validation document" if whole and shown_tokens == n else "Start of the first validation document"
        return (
            f"{what}, {shown}{n} tokens (tau={meta['tau']:g}): each token coloured by the depth "
            "spent predicting it,\ni.e. at the previous position (no colour: not predicted in the window); under it, "
            "its class: S syntax, F free, Ad answer-d"
        )
    n = len(text["per_token"])
    shown = f"{n} tokens" + (" (truncated to max_seq_len)" if text["truncated"] else "")
    shown += f", first {shown_tokens} shown" if shown_tokens < n else ""
    return f"{text['source']}, {shown}: coloured by realised depth (tau={meta['tau']:g})"


def _png_tokens(ax, toks: list[dict], cells: list[tuple[int, int, int]], colors: list[str], font: float) -> None:
    """The text panel: one cell per token in its depth's colour, with the legend of depths above."""
    from matplotlib.patches import Rectangle

    for t, (r, c, w) in zip(toks, cells, strict=True):
        ax.add_patch(Rectangle((c, r + 0.06), w, 0.88, facecolor=colors[t["depth"]], edgecolor="white", lw=0.8))
        label = _png_label(t["token"])[:w]
        ax.text(c, r + 0.5, label, va="center", fontsize=font, family="DejaVu Sans Mono", parse_math=False)
    _png_depth_legend(ax, colors)


def _png_depth_legend(ax, colors: list[str]) -> None:
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=c, label=f"depth {d}") for d, c in enumerate(colors)],
        loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(colors), frameon=False, fontsize=9,
    )  # fmt: skip


TAG_COLORS = {"S": "#777777", "F": "#1f77b4"}  # answers: ANSWER_COLOR
ANSWER_COLOR = "#6a3d9a"


def _png_predicted(ax, toks: list[dict], cells: list[tuple[int, int, int]], colors: list[str], font: float) -> None:
    """The labelled text panel: each token in the colour of the depth spent predicting it, its
    class's tag under it (two rows of the axes per line)."""
    from matplotlib.patches import Rectangle

    for t, (r, c, w) in zip(toks, cells, strict=True):
        y = 2 * r
        face, edge = ("white", "#999") if t["depth"] is None else (colors[t["depth"]], "white")
        ax.add_patch(Rectangle((c, y + 0.06), w, 0.88, facecolor=face, edgecolor=edge, lw=0.8))
        ax.text(c + w / 2, y + 0.5, _png_label(t["token"])[:w], ha="center", va="center", fontsize=font,
                family="DejaVu Sans Mono", parse_math=False)  # fmt: skip
        label = tag(t["class"])
        ax.text(c + w / 2, y + 1.35, label[:w], ha="center", va="center", fontsize=font * 0.8,
                family="DejaVu Sans Mono", parse_math=False, color=TAG_COLORS.get(label, ANSWER_COLOR),
                fontweight="normal" if label in TAG_COLORS else "bold")  # fmt: skip
    _png_depth_legend(ax, colors)


def _png_classes(ax, stats: dict, colors: list[str]) -> None:
    """One bar per class of the predicted token: the share of its tokens at each depth."""
    names = list(stats["classes"])
    for y, name in enumerate(names):
        left = 0.0
        for d, share in enumerate(stats["classes"][name].get("depth_hist") or []):
            ax.barh(y, share, left=left, color=colors[d], edgecolor="#555", lw=0.5)
            left += share
    ticks = [f"{n}\n{c['tokens']:,} tok, mean {_fmt(c['mean_depth'], '.2f')}" for n, c in stats["classes"].items()]
    ax.set_yticks(range(len(names)), ticks, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the class's tokens at each depth")
    rho = _fmt(stats["difficulty"]["spearman_depth_d"])
    ax.set_title(f"depth per class of the predicted token\nSpearman(depth, d) over answers: {rho}", fontsize=10)


def _png_histogram(ax, stats: dict, colors: list[str]) -> None:
    depths = np.arange(len(colors))
    ax.bar(depths, stats["depth_hist"], color=colors, edgecolor="#555")
    ax.set_xticks(depths)
    ax.set_xlabel("realised depth")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(f"validation depth histogram ({stats['tokens']:,} tokens, mean {stats['mean_depth']:.2f})")


def _png_per_depth(ax, stats: dict, n_depths: int) -> None:
    """Mean loss and predictive entropy at each depth some token reached."""
    depths = np.arange(n_depths)
    have = [d for d in depths if stats["depth_counts"][d]]
    for off, key, label, col in ((-0.2, "mean_loss_per_depth", "mean loss", "#4c72b0"),
                                 (0.2, "mean_entropy_per_depth", "mean entropy", "#dd8452")):  # fmt: skip
        ax.bar([d + off for d in have], [stats[key][d] for d in have], width=0.4, label=label, color=col)
    ax.set_xticks(depths)
    ax.set_xlabel("realised depth")
    ax.set_ylabel("nats")
    ax.set_ylim(0, 1.2 * max([stats[k][d] for d in have for k in ("mean_loss_per_depth", "mean_entropy_per_depth")]))
    ax.set_title("validation loss and predictive entropy per depth")
    ax.legend(fontsize=9, ncol=2, loc="upper right")


# ------------------------------------------------------------------ driver
def _val_windows(ck_dir: Path, data_dir: Path | None, seq_len: int,
                 n: int) -> tuple[Path, torch.Tensor, tuple[list[str], torch.Tensor] | None]:  # fmt: skip
    """The validation windows of the checkpoint's dataset (sharing its tokenizer) and, for a
    dataset with token labels, (class names, the windows' class ids), else None."""
    data_dir, meta = checkpoint_dataset(ck_dir, data_dir)
    windows = eval_windows(TokenShards(data_dir, "val"), seq_len, n)
    return data_dir, windows, window_labels(data_dir, meta, "val", seq_len, n)


def _text_tokens(model: PonderLM, tok: Tokenizer, ids: list[int], tau: float) -> list[dict]:
    """Per-token depth/loss/entropy of a token sequence (the last one predicts nothing)."""
    T = model.cfg.max_seq_len
    device = next(model.parameters()).device
    x, y = ids[:T], ids[1 : T + 1]
    y = y + [IGNORE] * (len(x) - len(y))  # a text's last token has no next token to score
    s = position_stats(model, torch.tensor([x], device=device), torch.tensor([y], device=device), tau)
    nxt = [tok.decode([i]) if i != IGNORE else None for i in y]
    return [
        {"token": tok.decode([i]), "depth": d, "loss": None if math.isnan(lo) else lo, "entropy": e, "next": n}
        for i, d, lo, e, n in zip(
            s["ids"].tolist(), s["depth"].tolist(), s["loss"].tolist(), s["entropy"].tolist(), nxt, strict=True
        )
    ]


def analyze(
    checkpoint: str | Path,
    *,
    text: str | None = None,
    data_dir: Path | None = None,
    tau: float | None = None,
    out: Path,
    windows: int = 64,
    overwrite: bool = False,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    log=print,
) -> dict:
    """Depth analysis of a checkpoint at ``tau`` (default: its cfg.tau) in the hard computation.

    Statistics come from ``windows`` validation windows of the checkpoint's dataset; ``text``
    (default: the first validation window) is shown token by token. Writes analysis.json,
    depth.html and depth.png under ``out`` (a ponderlm ``analysis`` directory: earlier results
    are replaced only with ``overwrite`` and only when ponderlm wrote them) and returns the
    analysis.json content. ``out`` is checked, and locked, before the model is loaded.
    """
    out = Path(out)
    for name, value in (("windows", windows), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if tau is not None:
        check_tau(tau)
    if text is not None:
        from ..errors import utf8_problem

        why = utf8_problem(text)
        if why:
            raise DataError(f"the text to visualise is {why}")
    with DirLock(out, "--out"):
        check_results_dir(out, "analysis", overwrite)  # before the model is loaded and run
        return _analyze(checkpoint, text, data_dir, tau, out, windows, batch_size, device, log)


def _analyze(checkpoint, text, data_dir, tau, out: Path, windows: int, batch_size: int, device, log) -> dict:
    model, tok, ck_dir = load_model(checkpoint, device)
    cfg = model.cfg
    tau = check_tau(cfg.tau if tau is None else tau)
    if text is not None:
        # the first max_seq_len tokens are shown (and the next one scores the last): a long text is
        # tokenized only that far, so its length costs its characters, not gigabytes of tokens
        ids, complete = encode_prefix(tok.encode, text, cfg.max_seq_len + 1)
        source = "given text"
        if not ids:
            raise DataError("the text to visualise is empty after tokenization")
        if len(ids) > cfg.max_seq_len:
            many = len(ids) if complete else f"more than {cfg.max_seq_len}"
            log(f"note: the text has {many} tokens; showing the first {cfg.max_seq_len} (max_seq_len)")
    data_dir, val, labels = _val_windows(ck_dir, data_dir, cfg.max_seq_len, windows)
    meta = {"checkpoint": str(ck_dir), "method": cfg.method, "K": cfg.max_depth, "tau": tau}
    log(threads.describe())
    log(f"analyze: {cfg.method} K={cfg.max_depth} tau={tau:g} on {len(val)} validation windows of {data_dir}")
    with heartbeat(f"analyze: scoring {len(val)} windows", log):
        positions = collect(model, val, tau, batch_size)
    stats = depth_summary(positions, cfg.max_depth, tok)
    if labels is not None:  # a labelled (synthetic) dataset: depth per class of the predicted token
        stats.update(class_summary(positions, labels[1], labels[0], cfg.max_depth))

    if text is None:
        ids, source = val[0].tolist(), "first validation window"  # L+1 tokens: every position has a target
    per_token = _text_tokens(model, tok, ids, tau)
    text_res = {
        "source": source,
        "tokens": len(per_token),
        "truncated": text is not None and len(ids) > cfg.max_seq_len,
        "mean_depth": sum(t["depth"] for t in per_token) / len(per_token),
        "per_token": per_token,
    }
    if text is None and labels is not None:
        text_res["predicted"] = _predicted(tok, ids, per_token, labels[0], labels[1][0].tolist())
    res = {**meta, "data_dir": str(data_dir), "windows": len(val), **stats, "text": text_res}

    files = {"depth.html": render_html(text_res, stats, meta), "depth.png": render_png(text_res, stats, meta),
             "analysis.json": json.dumps(res, indent=2) + "\n"}  # fmt: skip
    write_result_files(out, "analysis", files)
    _log_summary(stats, log)
    log(f"wrote {out / 'analysis.json'}, {out / 'depth.html'}, {out / 'depth.png'}")
    return res


def _predicted(tok: Tokenizer, ids: list[int], per_token: list[dict], classes: list[str],
               labels: list[int]) -> list[dict]:  # fmt: skip
    """The first validation window up to the end of its first document (the first window starts
    one), token by token: its class and the depth and loss of its prediction, made at the
    previous position (None for the window's first token, which nothing in the window predicts)."""
    eot = tok.eot_id
    end = next((j for j in range(1, len(ids)) if ids[j] == eot), len(ids) - 1)  # inclusive
    return [
        {
            "token": tok.decode([ids[j]]),
            "class": classes[labels[j]],
            "depth": per_token[j - 1]["depth"] if j else None,
            "loss": per_token[j - 1]["loss"] if j else None,
        }
        for j in range(end + 1)
    ]


def _log_summary(stats: dict, log) -> None:
    c = stats["correlations"]
    log(
        f"mean depth {stats['mean_depth']:.3f}; histogram "
        + " ".join(f"{d}:{h:.3f}" for d, h in enumerate(stats["depth_hist"]))
        + f"; corr(depth, loss) Pearson {_fmt(c['loss']['pearson'])} Spearman {_fmt(c['loss']['spearman'])}"
        + f"; corr(depth, entropy) Pearson {_fmt(c['entropy']['pearson'])} Spearman {_fmt(c['entropy']['spearman'])}"
    )
    if "classes" in stats:
        per = ", ".join(f"{k} {_fmt(v['mean_depth'], '.2f')}" for k, v in stats["classes"].items())
        log(f"mean depth per class of the predicted token: {per}; Spearman(depth, d) over answers "
            f"{_fmt(stats['difficulty']['spearman_depth_d'])}")  # fmt: skip

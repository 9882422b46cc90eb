"""The pages of ``ponderlm analyze``: ``depth.html`` (a text coloured by depth, with the statistics
as tables; standalone) and ``depth.png`` (the same at a glance), drawn from the content of
``analysis.json`` that :mod:`ponderlm.eval.analyze` computes (the statistics, the text token by
token and, on a labelled dataset, the first validation document with each token's class).
"""

from __future__ import annotations

import html
import io
import math

import numpy as np

from ponderlm.data.tokenizer import EOT

PNG_TOKENS = 512  # the figure shows at most this many tokens of the text


def tag(name: str) -> str:
    """A class's short tag under a token: S (syntax), F (free), A<d> (answer-d), else its first letters."""
    if name in ("syntax", "free"):
        return name[0].upper()
    return "A" + name[7:] if name.startswith("answer-") else name[:3]


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


def fmt(v: float | None, spec: str = ".3f") -> str:
    """A statistic for a table or a log line: "n/a" for none (or NaN)."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _html_tables(s: dict, over: str = "validation") -> str:
    """The statistics as tables; ``over``: "validation" (windows of the dataset) or "text" (the text's own)."""
    esc = html.escape
    c = s["correlations"]
    rows = [
        ("validation tokens" if over == "validation" else "tokens of the text", f"{s['tokens']:,}"),
        ("mean depth", fmt(s["mean_depth"])),
        ("mean loss", fmt(s["mean_loss"])),
        ("mean entropy", fmt(s["mean_entropy"])),
        ("depth vs loss: Pearson / Spearman", f"{fmt(c['loss']['pearson'])} / {fmt(c['loss']['spearman'])}"),
        ("depth vs entropy: Pearson / Spearman", f"{fmt(c['entropy']['pearson'])} / {fmt(c['entropy']['spearman'])}"),
    ]
    out = [f"<h2>{'Validation statistics' if over == 'validation' else 'Statistics of the text'}</h2><table>"]
    out += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows]
    out.append("</table><h3>Per depth</h3><table><tr><th>depth</th><th>tokens</th><th>fraction</th>")
    out.append("<th>mean loss</th><th>mean entropy</th></tr>")
    for d in range(len(s["depth_hist"])):
        out.append(
            f'<tr><td><span class="swatch d{d}">{d}</span></td><td>{s["depth_counts"][d]:,}</td>'
            f"<td>{s['depth_hist'][d]:.4f}</td><td>{fmt(s['mean_loss_per_depth'][d])}</td>"
            f"<td>{fmt(s['mean_entropy_per_depth'][d])}</td></tr>"
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
        f"there. Spearman(depth, d) over {dif['answer_tokens']:,} answer-d tokens: {fmt(dif['spearman_depth_d'])}; "
        f"mean depth on answer / free / syntax tokens: {fmt(m['answer'])} / {fmt(m['free'])} / "
        f"{fmt(m['syntax'])}.</p>",
        "<table><tr><th>class</th><th>tokens</th><th>mean depth</th>"
        + "".join(f'<th><span class="swatch d{d}">depth {d}</span></th>' for d in range(K1))
        + "<th>mean loss</th><th>accuracy</th></tr>",
    ]
    for name, c in s["classes"].items():
        hist = c.get("depth_hist") or [None] * K1
        out.append(
            f"<tr><th>{html.escape(name)}</th><td>{c['tokens']:,}</td><td>{fmt(c['mean_depth'])}</td>"
            + "".join(f"<td>{fmt(h)}</td>" for h in hist)
            + f"<td>{fmt(c['loss'])}</td><td>{fmt(c['acc'])}</td></tr>"
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
{_html_tables(stats, meta.get("statistics", "validation"))}
</body></html>
"""


def _html_text(text: dict, legend: str) -> str:
    """The text, each token coloured by the depth its own slot pondered."""
    esc = html.escape
    spans = []
    for t in text["per_token"]:
        title = f"depth {t['depth']} | loss {fmt(t['loss'])} | entropy {fmt(t['entropy'])}"
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
            shade, title = f"d{t['depth']}", f"predicted at depth {t['depth']} | loss {fmt(t['loss'])}"
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
    over = meta.get("statistics", "validation")
    _png_histogram(fig.add_subplot(gs[1, 0]), stats, colors, over)
    _png_per_depth(fig.add_subplot(gs[1, 1]), stats, len(colors), over)
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
    ticks = [f"{n}\n{c['tokens']:,} tok, mean {fmt(c['mean_depth'], '.2f')}" for n, c in stats["classes"].items()]
    ax.set_yticks(range(len(names)), ticks, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the class's tokens at each depth")
    rho = fmt(stats["difficulty"]["spearman_depth_d"])
    ax.set_title(f"depth per class of the predicted token\nSpearman(depth, d) over answers: {rho}", fontsize=10)


def _png_histogram(ax, stats: dict, colors: list[str], over: str = "validation") -> None:
    depths = np.arange(len(colors))
    ax.bar(depths, stats["depth_hist"], color=colors, edgecolor="#555")
    ax.set_xticks(depths)
    ax.set_xlabel("realised depth")
    ax.set_ylabel("fraction of tokens")
    what = "validation depth histogram" if over == "validation" else "depth histogram of the text"
    ax.set_title(f"{what} ({stats['tokens']:,} tokens, mean {stats['mean_depth']:.2f})")


def _png_per_depth(ax, stats: dict, n_depths: int, over: str = "validation") -> None:
    """Mean loss and predictive entropy at each depth some token reached (a mean over no token, as
    the loss of a text's last token, is left out)."""
    depths = np.arange(n_depths)
    have = [d for d in depths if stats["depth_counts"][d]]
    top = 0.0
    for off, key, label, col in ((-0.2, "mean_loss_per_depth", "mean loss", "#4c72b0"),
                                 (0.2, "mean_entropy_per_depth", "mean entropy", "#dd8452")):  # fmt: skip
        at = [d for d in have if stats[key][d] is not None]
        ax.bar([d + off for d in at], [stats[key][d] for d in at], width=0.4, label=label, color=col)
        top = max([top, *(stats[key][d] for d in at)])
    ax.set_xticks(depths)
    ax.set_xlabel("realised depth")
    ax.set_ylabel("nats")
    ax.set_ylim(0, 1.2 * top or 1.0)
    ax.set_title("validation loss and predictive entropy per depth" if over == "validation"
                 else "loss and predictive entropy per depth, the text")  # fmt: skip
    ax.legend(fontsize=9, ncol=2, loc="upper right")

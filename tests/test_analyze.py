"""Per-token depth analysis: rank statistics, per-position scores and `analyze` on tiny trained runs."""

import html
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ponderlm.errors import DataError, OwnershipError
from ponderlm.eval import analyze as analyze_mod
from ponderlm.eval import depth_render
from ponderlm.eval.analyze import analyze, collect
from ponderlm.eval.depth_render import _layout, render_png
from ponderlm.eval.perplexity import perplexity
from ponderlm.eval.stats import pearson, ranks, spearman
from ponderlm.model.model import CONVERGED

from conftest import tiny_model
from fakepkgs import build_fake_dataset

SPAN = re.compile(r'<span class="tok d(\d+)" title="([^"]*)">(.*?)</span>', re.DOTALL)
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A prepared fake dataset and two 3-step runs on it (trained concurrently): ponderlm3 with a
    spread router (bias 0, so tau=0.3 prunes some tokens to depth 1 or 0) and vanilla."""
    root = tmp_path_factory.mktemp("analyze")
    data = build_fake_dataset(root / "d")
    procs = {}
    for method, extra in (("ponderlm3", ["model.router_init_bias=0.0"]), ("vanilla", [])):
        train = [sys.executable, "-m", "ponderlm", "train", f"train.data_dir={data}", f"train.out_dir={root / method}",
                 "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.max_ponder_steps=2",
                 "train.seq_len=32", "train.batch_size=4", "train.max_steps=3", "train.eval_windows=4",
                 "train.progress=false", f"model.method={method}", "model.max_seq_len=64", *extra]  # fmt: skip
        procs[method] = subprocess.Popen(train, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for p in procs.values():
        _, err = p.communicate()
        assert p.returncode == 0, err
    return {m: root / m for m in procs}


def test_spearman_by_hand():
    assert ranks(np.array([3, 1, 3, 2])).tolist() == [3.5, 1.0, 3.5, 2.0]  # ties share the mean rank
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]: centred products 4.5, squares 4.5 and 5
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 3, 2, 4])) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    x = np.array([0.1, 5.0, 2.0, 3.0, -1.0])
    assert spearman(x, x**3) == pytest.approx(1.0) and spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, np.full(5, 2.0)) is None and spearman(np.zeros(5), x) is None and spearman(x[:1], x[:1]) is None


def test_collect_matches_perplexity():
    """Per-position losses average to perplexity()'s loss and depths give its histogram; entropy
    is the entropy of the softmax; the input ids are the window's inputs."""
    model = tiny_model("ponderlm3")
    windows = torch.randint(0, 61, (5, 33))
    s = collect(model, windows, tau=0.4, batch_size=2)
    ref = perplexity(model, windows, mode="hard", tau=0.4, batch_size=5, **CONVERGED)  # eval's default computation
    assert s["depth"].shape == (5 * 32,) and len(s["depth"].unique()) > 1
    assert float(s["loss"].mean()) == pytest.approx(ref["loss"], rel=1e-6)  # perplexity() scores in float32
    assert (torch.bincount(s["depth"], minlength=3) / len(s["depth"])).tolist() == pytest.approx(ref["depth_hist"])
    assert torch.equal(s["ids"], windows[:, :-1].flatten())
    with torch.no_grad():
        logits = model(windows[:2, :-1], mode="hard", tau=0.4, **CONVERGED).logits
    want = torch.distributions.Categorical(logits=logits).entropy().flatten()
    assert torch.allclose(s["entropy"][: 2 * 32], want, atol=1e-12)


def test_analyze_ponderlm3(runs, tmp_path, monkeypatch):
    out = tmp_path / "a"
    res = analyze(runs["ponderlm3"], tau=0.3, out=out, windows=16, **QUIET)
    # no temp files; the marker says ponderlm made the directory
    assert sorted(p.name for p in out.iterdir()) == [".ponderlm", "analysis.json", "depth.html", "depth.png"]
    assert (out / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "analysis.json").read_text()) == res
    assert res["K"] == 2 and res["tau"] == 0.3 and res["tokens"] == 16 * 64
    hist = res["depth_hist"]
    assert sum(hist) == pytest.approx(1.0) and sum(c > 0 for c in res["depth_counts"]) >= 2
    assert res["mean_depth"] == pytest.approx(sum(d * h for d, h in enumerate(hist)))
    per_depth = [(h, m) for h, m in zip(hist, res["mean_loss_per_depth"], strict=True) if h > 0]
    assert res["mean_loss"] == pytest.approx(sum(h * m for h, m in per_depth))
    for c in res["correlations"].values():
        assert -1 <= c["pearson"] <= 1 and -1 <= c["spearman"] <= 1
    deep, shallow = res["deepest_tokens"], res["shallowest_tokens"]
    assert deep and all(r["count"] >= 20 for r in deep + shallow)
    assert [r["mean_depth"] for r in deep] == sorted((r["mean_depth"] for r in deep), reverse=True)
    assert deep[0]["mean_depth"] >= shallow[0]["mean_depth"]
    text = res["text"]  # default: the first validation window, every position with a target
    assert text["tokens"] == 64 and all(t["loss"] is not None for t in text["per_token"])
    assert len(SPAN.findall((out / "depth.html").read_text())) == 64

    def boom(*a, **k):
        raise AssertionError("loaded the model before refusing")

    monkeypatch.setattr(analyze_mod, "load_model", boom)
    with pytest.raises(OwnershipError, match="exists; pass --overwrite"):
        analyze(runs["ponderlm3"], tau=0.3, out=out, **QUIET)


def test_analyze_text_html(runs, tmp_path):
    """One span per token, depth classes and tooltips from the analysis, HTML escaped, and the
    spans' text (markers removed) is the input text again."""
    out = tmp_path / "a"
    out.mkdir()
    (out / "analysis.json").write_text("{}")  # replaced: overwrite=True
    text = 'Use <b>bold</b> & "quotes"\n\nsaid the\tpeople.'
    res = analyze(runs["ponderlm3"], text=text, tau=0.3, out=out, windows=2, overwrite=True, **QUIET)
    page = (out / "depth.html").read_text()
    spans = SPAN.findall(page)
    per_token = res["text"]["per_token"]
    assert res["text"]["source"] == "given text" and not res["text"]["truncated"]
    assert len(spans) == len(per_token) == res["text"]["tokens"] > 5
    assert "<b>" not in page and "</b>" not in page and all(e in page for e in ("&lt;", "&gt;", "&amp;", "&quot;"))
    assert [int(d) for d, _, _ in spans] == [t["depth"] for t in per_token]
    assert html.unescape(spans[0][1]).startswith(f"depth {per_token[0]['depth']} | loss ")
    assert "loss n/a" in spans[-1][1] and per_token[-1]["loss"] is None  # the last token predicts nothing
    shown = "".join(html.unescape(s[2]) for s in spans)
    assert shown.replace("↵\n", "\n").replace("→\t", "\t") == text


def test_analyze_vanilla_constant_depth(runs, tmp_path):
    res = analyze(runs["vanilla"], text="the people of the world " * 40, out=tmp_path / "v", windows=4, **QUIET)
    assert res["K"] == 0 and res["depth_hist"] == [1.0] and res["mean_depth"] == 0.0
    assert all(v is None for c in res["correlations"].values() for v in c.values())
    assert res["text"]["truncated"] and res["text"]["tokens"] == 64
    assert (tmp_path / "v" / "depth.png").is_file() and (tmp_path / "v" / "depth.html").is_file()
    with pytest.raises(DataError, match="empty after tokenization"):
        analyze(runs["vanilla"], text="", out=tmp_path / "e", **QUIET)
    assert not (tmp_path / "e").exists()


def test_png_layout_wraps_lines(monkeypatch):
    """Tokens wrap at the line width, a newline token ends its line, over-long tokens are cut to
    one line, and a long text renders (its first PNG_TOKENS tokens; an empty depth draws no bars)."""
    toks = ["ab", "\n", "c" * 300, "d", " e", "\n\n", "f"]
    assert _layout(toks, 10) == [(0, 0, 2), (0, 2, 1), (1, 0, 10), (2, 0, 1), (2, 1, 2), (2, 3, 2), (3, 0, 1)]
    per_token = [{"token": t, "depth": i % 3, "loss": 1.0, "entropy": 2.0, "next": "x"} for i, t in
                 enumerate(toks * 10)]  # fmt: skip
    text = {"source": "given text", "per_token": per_token, "truncated": False}
    stats = {"depth_hist": [0.2, 0.0, 0.8], "depth_counts": [2, 0, 8], "tokens": 10, "mean_depth": 1.6,
             "mean_loss_per_depth": [1.0, None, 3.0], "mean_entropy_per_depth": [2.0, None, 1.0]}  # fmt: skip
    monkeypatch.setattr(depth_render, "PNG_TOKENS", 30)
    png = render_png(text, stats, {"K": 2, "tau": 0.3})
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_a_text_alone_scores_no_dataset(runs, tmp_path, monkeypatch):
    """A text without `windows`: the statistics are the text's own (the loss where a next token
    follows), and no dataset is read or scored; with `windows`, the validation windows as before."""
    text = "the people of the world said the state of the people"
    with_windows = analyze(runs["ponderlm3"], text=text, tau=0.3, out=tmp_path / "w", windows=2, **QUIET)
    assert with_windows["statistics"] == "validation" and with_windows["windows"] == 2

    def boom(*a, **k):
        raise AssertionError("read or scored the dataset for a text alone")

    monkeypatch.setattr(analyze_mod, "checkpoint_dataset", boom)
    monkeypatch.setattr(analyze_mod, "collect", boom)
    said: list[str] = []
    res = analyze(runs["ponderlm3"], text=text, tau=0.3, out=tmp_path / "t", log=said.append)
    per = res["text"]["per_token"]
    assert res["statistics"] == "text" and res["windows"] == 0 and res["data_dir"] is None
    assert res["tokens"] == len(per) == res["text"]["tokens"] == with_windows["text"]["tokens"]
    assert [t["depth"] for t in per] == [t["depth"] for t in with_windows["text"]["per_token"]]
    assert res["depth_counts"] == [sum(t["depth"] == d for t in per) for d in range(3)]
    losses = [t["loss"] for t in per if t["loss"] is not None]
    assert len(losses) == len(per) - 1 and res["mean_loss"] == pytest.approx(sum(losses) / len(losses))
    assert res["mean_entropy"] == pytest.approx(sum(t["entropy"] for t in per) / len(per))
    page = (tmp_path / "t" / "depth.html").read_text()
    assert "Statistics of the text" in page and "Validation statistics" not in page
    assert any("the dataset is not scored" in line for line in said)
    one = analyze(runs["vanilla"], text="a", out=tmp_path / "one", **QUIET)  # nothing predicted: no loss
    assert one["tokens"] == 1 and one["mean_loss"] is None and one["mean_loss_per_depth"] == [None]
    assert (tmp_path / "one" / "depth.png").is_file()


def test_the_command_analyzes_a_text_without_the_dataset(runs, tmp_path):
    """`ponderlm analyze --text` as a user runs it: the run's dataset is moved away, and the command
    still succeeds, with the text's own statistics (it would fail reading the dataset otherwise)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["ponderlm3"], run)
    data = runs["ponderlm3"].parent / "d"
    hidden = data.with_name("d_away")
    data.rename(hidden)
    try:
        r = subprocess.run([sys.executable, "-m", "ponderlm", "analyze", "--checkpoint", str(run), "--text",
                            "the people of the world", "--out", str(tmp_path / "a")],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        with_windows = subprocess.run([sys.executable, "-m", "ponderlm", "analyze", "--checkpoint", str(run),
                                       "--text", "the people", "--windows", "2", "--out", str(tmp_path / "b")],
                                      capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        hidden.rename(data)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert res["statistics"] == "text" and res["windows"] == 0 and res["data_dir"] is None
    assert with_windows.returncode == 2 and "error:" in with_windows.stderr  # asked for the dataset: it is gone

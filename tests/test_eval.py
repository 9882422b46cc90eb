"""Zero-shot task loading (lm-eval templates), log-likelihood scoring and `ponderlm eval`."""

import json
import re
import subprocess
import sys

import pytest
import torch

from ponderlm.data.tokenizer import Tokenizer
from ponderlm.eval import zeroshot
from ponderlm.eval.tasks import TASKS, Doc, hellaswag_preprocess, load_tasks
from ponderlm.eval.zeroshot import Scored, encode_pair, loglikelihoods, score_task

from conftest import tiny_model
from fakepkgs import WORDS, build_fake_dataset, make_fake_olmo_eval, paragraph


@pytest.fixture(scope="module")
def olmo_cache(tmp_path_factory):
    return make_fake_olmo_eval(tmp_path_factory.mktemp("olmo"))


@pytest.fixture(scope="module")
def tok():
    import random

    rng = random.Random(0)
    return Tokenizer.train_bpe([paragraph(rng, 20) for _ in range(50)] + [" ".join(WORDS)], vocab_size=300)


def test_tasks_follow_lm_eval_templates(olmo_cache):
    t = load_tasks(list(TASKS), olmo_cache, log=lambda *_: None)
    assert all(len(v) == 6 for v in t.values())  # duplicates with doc_id >= 1e6 skipped
    arc = t["arc_easy"][0]
    assert arc.contexts[0].startswith("Question: ") and arc.contexts[0].endswith("\nAnswer:")
    assert all(c.startswith(" ") for c in arc.continuations) and len(arc.continuations) == 4
    assert not arc.contexts[0].startswith("5-shot")  # zero-shot: the doc's query, not the request
    piqa = t["piqa"][1]
    assert piqa.contexts[0].startswith("Question: ") and piqa.gold == 1
    hs = t["hellaswag"][0]
    assert hs.contexts[0] == "Roof work: A man is on a roof. He"
    assert hs.continuations[:2] == (" is up. there.", " is here.")
    wg = t["winogrande"][1]
    assert wg.contexts == ("Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria")
    assert wg.continuations == (" got the easy cases.",) * 2 and wg.gold == 1
    sq = t["sciq"][0]
    assert sq.contexts[0].startswith("Some support.\nQuestion: ") and sq.gold == 3
    assert sq.continuations == (" a", " b", " c", " d")
    assert t["lambada"][0].continuations[0].startswith(" ")
    assert len(load_tasks(["piqa"], olmo_cache, limit=2, log=lambda *_: None)["piqa"]) == 2


def test_hellaswag_preprocess():
    assert hellaswag_preprocess(" A [title] B [header] C  D ") == "A. B  C D".replace("  ", " ")


def test_encode_pair_moves_trailing_space(tok):
    ctx, cont = encode_pair(tok, "the state of ", "the world")
    assert tok.decode(ctx) == "the state of" and tok.decode(cont) == " the world"
    assert encode_pair(tok, "", "the")[0] == [tok.eot_id]


def test_loglikelihoods_equal_direct_computation(tok):
    """Batching, sorting and right padding change nothing: each score equals an unpadded forward."""
    model = tiny_model("ponderlm3", vocab_size=320, max_seq_len=64)
    pairs = [("the state of", " the world"), ("one", " two three four five six"), ("of the people", " and")]
    got, stats = loglikelihoods(model, tok, pairs, tau=0.3, batch_size=2)
    for (c, x), s in zip(pairs, got, strict=True):
        ctx, cont = encode_pair(tok, c, x)
        full = torch.tensor([ctx + cont])
        with torch.no_grad():
            out = model(full[:, :-1], mode="hard", tau=0.3)
        lp = out.logits.log_softmax(-1)[0, -len(cont) :]
        want = lp.gather(-1, torch.tensor(cont)[:, None]).sum()
        assert abs(s.loglik - float(want)) < 1e-9
        assert s.greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())
    assert stats["tokens"] > 0 and 0 <= stats["mean_depth"] <= 2 and stats["flops_per_token"] > 0


def test_score_task_metrics(monkeypatch, tok):
    docs = [
        Doc("piqa", 0, ("c", "c"), (" aa", " b"), 0, ("aa", "b")),
        Doc("piqa", 1, ("c", "c"), (" aa", " b"), 1, ("aa", "b")),
    ]
    lls = iter([-2.0, -1.5, -2.0, -1.5])  # raw picks b both times; per-char picks aa (-1.0 vs -1.5)

    def fake(model, tok, pairs, **kw):
        return [Scored(next(lls), False) for _ in pairs], {"tokens": 1.0, "mean_depth": 0.0, "flops_per_token": 1.0}

    monkeypatch.setattr(zeroshot, "loglikelihoods", fake)
    r = score_task(None, tok, docs, tau=0.1)
    assert r["acc"] == 0.5 and r["acc_norm"] == 0.5 and r["n"] == 2
    lam = [Doc("lambada", i, ("c",), (" w",), 0, (" w",)) for i in range(2)]
    it = iter([Scored(-1.0, True), Scored(-3.0, False)])
    monkeypatch.setattr(zeroshot, "loglikelihoods", lambda m, t, p, **kw: ([next(it) for _ in p], {"tokens": 1.0}))
    r = score_task(None, tok, lam, tau=0.1)
    assert r["acc"] == 0.5 and abs(r["ppl"] - 2.718281828**2) < 1e-6


def test_eval_cli_end_to_end(tmp_path, olmo_cache):
    data = build_fake_dataset(tmp_path / "d")
    run = tmp_path / "run"
    train = [sys.executable, "-m", "ponderlm", "train", f"train.data_dir={data}", f"train.out_dir={run}",
             "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.max_ponder_steps=2",
             "train.seq_len=32", "train.batch_size=4", "train.max_steps=3", "train.eval_windows=4",
             "train.progress=false"]  # fmt: skip
    assert subprocess.run(train, capture_output=True).returncode == 0
    cmd = [sys.executable, "-m", "ponderlm", "eval", "--checkpoint", str(run), "--cache-dir", str(olmo_cache),
           "--tau", "1e-4", "0.3", "--limit", "3", "--ppl-windows", "4"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert {row["task"] for row in res["rows"]} == {"val", "ptb_test", *TASKS}
    assert len(res["rows"]) == 2 * (2 + len(TASKS))
    assert all("flops_per_token" in row and "mean_depth" in row for row in res["rows"])
    md = (run / "eval" / "eval.md").read_text()
    assert re.search(r"\| 0\.3 \| piqa \| 3 \| [\d,]+ \| acc \|", md)
    # every perplexity comes with the windows and tokens it is over, in the table and on its line
    val = next(row for row in res["rows"] if row["task"] == "val" and row["tau"] == 0.3)
    assert 1 <= val["n"] <= 4 and val["tokens"] > 0  # at most --ppl-windows: as many as the split holds
    assert f"| 0.3 | val | {val['n']} | {val['tokens']:,} | ppl |" in md
    assert f"tau=0.3 val: loss {val['loss']:.4f} ppl {val['ppl']:.2f} " in r.stdout
    assert f"({val['n']} windows, {val['tokens']:,} tokens)" in r.stdout
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr and "Traceback" not in again.stderr
    base = [sys.executable, "-m", "ponderlm", "eval", "--checkpoint", str(run), "--cache-dir", str(olmo_cache)]
    bad = subprocess.run([*base, "--tasks", "piqa,mmlu", "--out", str(tmp_path / "e2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown task(s) mmlu" in bad.stderr
    abl = [*base, "--tasks", "val", "--ppl-windows", "4", "--tau", "0.3", "--out", str(tmp_path / "e3")]
    r = subprocess.run([*abl, "--ablation", "random"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "e3" / "eval.json").read_text())
    assert res["ablation"] == "random" and res["rows"][0]["task"] == "val"
    assert "Ablation: **random**" in (tmp_path / "e3" / "eval.md").read_text()
    for flag, needle in (("fixed:5", "fixed depth must lie in [0, 2]"), ("oracle", "--ablation must be fixed:D")):
        r = subprocess.run([*abl, "--ablation", flag, "--overwrite"], capture_output=True, text=True)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([*base, "--tasks", "piqa", "--ablation", "entropy", "--out", str(tmp_path / "e4")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "ablations apply to the perplexity sets" in r.stderr

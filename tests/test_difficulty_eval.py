"""Per-class evaluation on a labelled (synthetic) dataset: `ponderlm eval` and `ponderlm analyze`
report loss, accuracy and realised depth per class of the *predicted* token, and these numbers add
up to the overall ones and agree with a computation done here from the model's own outputs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ponderlm.data import LabelShards, SyntheticConfig, TokenShards, eval_windows, synthesize
from ponderlm.eval.ablations import Ablation
from ponderlm.eval.analyze import analyze
from ponderlm.eval.evaluate import evaluate_checkpoint, markdown
from ponderlm.eval.perplexity import class_sums, difficulty
from ponderlm.eval.stats import spearman
from ponderlm.loading import load_model
from ponderlm.model.model import CONVERGED

from errorcases import TINY, run_cli

# short chains episodes (C=2, H=3, Q=3), so that six validation documents hold every answer class
CHAINS = SyntheticConfig(task="chains", train_docs=60, val_docs=6, episodes=3, chains=2, max_hops=3, queries=3)
SEQ = 32  # the run's max_seq_len: windows of 33 tokens
WINDOWS, BATCH, TAU = 12, 4, 0.3
OLD_KEYS = {"tau", "task", "n", "tokens", "loss", "ppl", "mean_depth", "flops_per_token", "depth_hist", "seconds"}


def quiet(*_) -> None:
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A labelled chains dataset, the same dataset without its labels, and a tiny PonderLM-3 trained
    on it for 2 steps (router bias 0: at tau=0.3 depths vary from token to token)."""
    from ponderlm.runs.config import load_run_config
    from ponderlm.training.trainer import train

    root = tmp_path_factory.mktemp("difficulty")
    ds = root / "chains"
    synthesize(replace(CHAINS, out_dir=ds), log=quiet)
    plain = root / "plain"
    shutil.copytree(ds, plain)
    meta = json.loads((plain / "meta.json").read_text())
    del meta["labels"]
    (plain / "meta.json").write_text(json.dumps(meta))
    cfg, explicit = load_run_config(None, [*TINY, f"model.max_seq_len={SEQ}", "model.router_init_bias=0.0",
                                           f"train.data_dir={ds}", f"train.out_dir={root / 'run'}"])  # fmt: skip
    train(cfg, explicit, log=quiet)
    labels = LabelShards(ds, "val")
    return {
        "root": root,
        "data": ds,
        "plain": plain,
        "run": root / "run",
        "windows": eval_windows(TokenShards(ds, "val"), SEQ, WINDOWS),
        "labels": eval_windows(labels, SEQ, WINDOWS),
        "classes": labels.classes,
    }


def evaluate(world, **kw) -> dict:
    args = dict(tasks=["val"], taus=[TAU], cache_dir=world["root"] / "cache", ppl_windows=WINDOWS, batch_size=BATCH,
                log=quiet)  # fmt: skip
    return evaluate_checkpoint(world["run"], **{**args, **kw})


def by_hand(world, target_shift: int = 1) -> dict[str, dict[str, float]]:
    """Per-class loss, accuracy and mean depth from model(x, mode="hard") in this file's own code.
    Position t is attributed to the class of token t + target_shift of the window (1: the target)."""
    model, _, _ = load_model(world["run"])
    w, lab = world["windows"], world["labels"]
    T = w.shape[1] - 1
    logits, depth = [], []
    with torch.no_grad():
        for i in range(0, len(w), BATCH):  # the batches eval uses: the same float32 arithmetic
            out = model(w[i : i + BATCH, :-1], mode="hard", tau=TAU, **CONVERGED)  # eval's default scoring
            logits.append(out.logits)
            depth.append(out.depth)
    logits, depth = torch.cat(logits).double(), torch.cat(depth).double()  # (N, T, V), (N, T)
    y = w[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    correct = (logits.argmax(-1) == y).double()
    cls = lab[:, target_shift : target_shift + T]  # (N, T)
    res = {}
    for c, name in enumerate(world["classes"]):
        m = cls == c
        if m.any():
            res[name] = {"tokens": int(m.sum()), "loss": float(loss[m].mean()), "acc": float(correct[m].mean()),
                         "mean_depth": float(depth[m].mean())}  # fmt: skip
    return res


def test_per_class_numbers_add_up_to_the_totals(world):
    res = evaluate(world, taus=[1e-4, TAU])
    target = world["labels"][:, 1:]
    counts = torch.bincount(target.flatten(), minlength=len(world["classes"])).tolist()
    assert all(n > 0 for n in counts)  # every class, every answer difficulty, is scored
    for row in res["rows"]:
        classes = row["classes"]
        assert list(classes) == world["classes"]  # the dataset's class order
        total = row["n"] * SEQ
        assert [c["tokens"] for c in classes.values()] == counts and sum(counts) == total
        for key in ("loss", "mean_depth"):
            weighted = sum(c["tokens"] * c[key] for c in classes.values()) / total
            assert weighted == pytest.approx(row[key], rel=1e-9, abs=0)
        hist = np.sum([np.multiply(c["depth_hist"], c["tokens"]) for c in classes.values()], axis=0) / total
        assert hist.tolist() == pytest.approx(row["depth_hist"], rel=1e-12)
        dif = row["difficulty"]
        answers = [c for name, c in classes.items() if name.startswith("answer-")]
        assert dif["answer_tokens"] == sum(c["tokens"] for c in answers)
        answer_depth = sum(c["tokens"] * c["mean_depth"] for c in answers) / dif["answer_tokens"]
        assert dif["mean_depth"]["answer"] == pytest.approx(answer_depth, rel=1e-12)
        assert dif["mean_depth"]["free"] == classes["free"]["mean_depth"]
        assert dif["mean_depth"]["syntax"] == classes["syntax"]["mean_depth"]
    low, mid = res["rows"]
    assert all(c["mean_depth"] == 2 for c in low["classes"].values())  # tau 1e-4 prunes nothing (K=2)
    assert low["difficulty"]["spearman_depth_d"] is None  # constant depth: no correlation is defined
    assert len({round(c["mean_depth"], 9) for c in mid["classes"].values()}) > 1


def test_per_class_numbers_match_the_model_and_attribute_the_target(world):
    """Loss, accuracy and depth per class recomputed here from model(...) agree; attributing each
    position to its own input token's class instead (the off-by-one) would not."""
    row = evaluate(world)["rows"][0]
    want = by_hand(world)
    assert set(want) == set(row["classes"])
    for name, c in row["classes"].items():
        assert c["tokens"] == want[name]["tokens"]
        assert c["acc"] == pytest.approx(want[name]["acc"], abs=1e-12)
        assert c["mean_depth"] == pytest.approx(want[name]["mean_depth"], abs=1e-12)
        assert c["loss"] == pytest.approx(want[name]["loss"], rel=1e-5)  # eval's cross-entropy is in float32
    shifted = by_hand(world, target_shift=0)  # each position counted for the token it reads
    assert any(abs(shifted[n]["mean_depth"] - row["classes"][n]["mean_depth"]) > 1e-3 for n in shifted)
    assert any(abs(shifted[n]["acc"] - row["classes"][n]["acc"]) > 1e-3 for n in shifted)
    # and the Spearman correlation is the helper's over the answer tokens, one entry per token
    hand_d, hand_depth = [], []
    for name, c in row["classes"].items():
        if name.startswith("answer-"):
            counts = np.round(np.multiply(c["depth_hist"], c["tokens"])).astype(int)
            hand_depth += np.repeat(np.arange(len(counts)), counts).tolist()
            hand_d += [int(name[7:])] * c["tokens"]
    assert row["difficulty"]["spearman_depth_d"] == pytest.approx(spearman(np.array(hand_depth), np.array(hand_d)))


def test_exact_mode_and_ablations_are_scored_per_class_too(world):
    exact = evaluate(world, mode="exact")["rows"][0]
    assert sum(c["tokens"] for c in exact["classes"].values()) == WINDOWS * SEQ
    weighted = sum(c["tokens"] * c["loss"] for c in exact["classes"].values()) / (WINDOWS * SEQ)
    assert weighted == pytest.approx(exact["loss"], rel=1e-9, abs=0)
    fixed = evaluate(world, ablation=Ablation("fixed", depth=1))["rows"][0]
    assert all(c["mean_depth"] == 1 and c["depth_hist"] == [0, 1, 0] for c in fixed["classes"].values())


def test_a_dataset_without_labels_keeps_the_old_output(world):
    plain = evaluate(world, data_dir=world["plain"])
    labelled = evaluate(world)
    row, lab = plain["rows"][0], labelled["rows"][0]
    assert set(row) == OLD_KEYS and set(lab) == OLD_KEYS | {"classes", "difficulty"}
    assert row["depth_hist"] == lab["depth_hist"] and row["mean_depth"] == lab["mean_depth"]
    assert row["loss"] == pytest.approx(lab["loss"], rel=1e-6)  # summed per token (labelled) or at once
    assert "Per class" not in markdown(plain) and "Per class" in markdown(labelled)


def test_difficulty_from_class_sums():
    """Spearman of depth with d over answer tokens only; None for a constant depth; syntax and free
    tokens do not enter it."""
    classes = ["syntax", "free", "answer-1", "answer-2", "answer-3"]
    lab = torch.tensor([0, 0, 1, 2, 2, 3, 3, 4, 4])
    depth = torch.tensor([2, 0, 2, 0, 1, 1, 1, 2, 1])
    sums = class_sums(lab, torch.ones(9), torch.ones(9, dtype=torch.bool), depth, len(classes), 2)
    d = difficulty(sums, classes)
    ans = lab >= 2
    assert d["answer_tokens"] == 6
    assert d["spearman_depth_d"] == pytest.approx(spearman(depth[ans].numpy(), lab[ans].numpy()))
    assert d["mean_depth"] == {"answer": 1.0, "free": 2.0, "syntax": 1.0}
    flat = difficulty(class_sums(lab, torch.ones(9), torch.ones(9, dtype=torch.bool), torch.ones(9), 5, 2), classes)
    assert flat["spearman_depth_d"] is None


def test_analyze_reports_the_per_class_depths_eval_does(world, tmp_path):
    out = tmp_path / "a"
    res = analyze(world["run"], tau=TAU, out=out, windows=WINDOWS, batch_size=BATCH, log=quiet)
    assert sorted(p.name for p in out.iterdir()) == [".ponderlm", "analysis.json", "depth.html", "depth.png"]
    assert json.loads((out / "analysis.json").read_text()) == res
    row = evaluate(world)["rows"][0]
    for name, c in res["classes"].items():
        e = row["classes"][name]
        assert c["tokens"] == e["tokens"] and c["depth_hist"] == e["depth_hist"]
        assert c["mean_depth"] == pytest.approx(e["mean_depth"], abs=1e-12)
    dif, want = res["difficulty"], row["difficulty"]
    assert dif["answer_tokens"] == want["answer_tokens"] and dif["mean_depth"] == pytest.approx(want["mean_depth"])
    assert dif["spearman_depth_d"] == pytest.approx(want["spearman_depth_d"])
    # the picture: the first document, each token with the depth of the position that predicted it
    per_token, shown = res["text"]["per_token"], res["text"]["predicted"]
    first = world["labels"][0].tolist()
    assert shown[0]["depth"] is None and 2 <= len(shown) <= SEQ + 1
    for j, t in enumerate(shown[1:], 1):
        assert t["depth"] == per_token[j - 1]["depth"] and t["token"] == per_token[j - 1]["next"]
        assert t["class"] == world["classes"][first[j]]
    page = (out / "depth.html").read_text()
    assert "Per class of the predicted token" in page and "spent predicting it" in page
    assert page.count('<span class="cell"') == len(shown)
    assert (out / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_eval_prints_the_per_class_table(world, tmp_path):
    r = run_cli(["eval", "--checkpoint", str(world["run"]), "--tasks", "val", "--tau", str(TAU), "--ppl-windows",
                 str(WINDOWS), "--cache-dir", str(tmp_path / "cache"), "--out", "e"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "| tau | task | class | tokens | loss | acc | mean depth | depth histogram |" in r.stdout
    for name in world["classes"]:
        assert f"| {TAU:g} | val | {name} | " in r.stdout
    assert "Spearman(depth, d) over" in r.stdout
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert list(res["rows"][0]["classes"]) == world["classes"]

"""`ponderlm quickstart --smoke` end to end on the stand-in corpus packages: the default corpus is
built, the three models are trained and evaluated, the report is written, and a second invocation
reuses the finished runs instead of retraining them."""

from __future__ import annotations

import itertools
import json
import math
import re

from ponderlm.cli.main import main
from ponderlm.experiments.quickstart import SMOKE_TIME, TAUS

from fakepkgs import make_fake_packages


def test_quickstart_smoke_builds_the_corpus_trains_three_models_and_reuses_them(tmp_path, capsys):
    cache = make_fake_packages(tmp_path / "cache", wiki_docs=3000)  # a validation split of several windows
    args = ["quickstart", "--smoke", "--out", str(tmp_path / "qs"), "--data", str(tmp_path / "data"),
            "--cache-dir", str(cache)]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out
    assert SMOKE_TIME in first and (tmp_path / "data" / "meta.json").is_file()
    assert re.search(r"^threads: \d+ \(", first, flags=re.M)  # how many threads, and why
    assert all(f"evaluating {m}: validation loss on 16 windows" in first for m in ("vanilla", "ponderlm2", "ponderlm3"))
    report = json.loads((tmp_path / "qs" / "report.json").read_text())
    # the report says what its validation losses are over, and eval scores the same windows
    r0 = report["results"][0]
    assert r0["val_tokens"] == r0["val_windows"] * 128 and r0["val_windows"] <= 16
    md = (tmp_path / "qs" / "report.md").read_text()
    assert (f"Validation: the first {r0['val_windows']} windows of the context, {r0['val_tokens']:,} scored tokens "
            f"of the {r0['val_split_tokens']:,} in the validation split") in md  # fmt: skip
    got = sorted((p["run"], p["tau"]) for p in report["points"])
    assert got == sorted([("vanilla", None), ("ponderlm2", None), *(("ponderlm3", t) for t in TAUS)])
    for p in report["points"]:
        assert math.isfinite(p["loss"]) and p["flops_per_token"] > 0
        assert p["mean_depth"] == {"vanilla": 0.0, "ponderlm2": 2.0}.get(p["run"], p["mean_depth"])
    # pruning can only remove latent steps: PonderLM-3's depth falls (weakly) as tau grows
    depths = [p["mean_depth"] for p in sorted((q for q in report["points"] if q["run"] == "ponderlm3"),
                                              key=lambda q: q["tau"])]  # fmt: skip
    assert all(a >= b for a, b in itertools.pairwise(depths)) and depths[0] <= 2.0
    for name in ("report.md", "report.png"):
        assert (tmp_path / "qs" / name).stat().st_size > 0
    # `ponderlm eval` on the same checkpoint and windows gives the report's number
    want = next(p["loss"] for p in report["points"] if p["run"] == "ponderlm3" and p["tau"] == 0.05)
    ev = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(tmp_path / "qs" / "ponderlm3"), "--tasks", "val", "--tau", "0.05",
                 "--ppl-windows", "16", "--out", str(ev)]) == 0  # fmt: skip
    got = json.loads((ev / "eval.json").read_text())["rows"][0]
    assert got["n"] == r0["val_windows"] and got["tokens"] == r0["val_tokens"]
    assert math.isclose(got["loss"], want, rel_tol=1e-9)
    capsys.readouterr()
    runs = ("vanilla", "ponderlm2", "ponderlm3")
    stamps = {m: (tmp_path / "qs" / m / "metrics.jsonl").stat().st_mtime_ns for m in runs}

    assert main(args) == 0  # finished runs are reused, not retrained
    assert "training" not in capsys.readouterr().out.lower().replace("training of each run", "")
    assert stamps == {m: (tmp_path / "qs" / m / "metrics.jsonl").stat().st_mtime_ns for m in stamps}

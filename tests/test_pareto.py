"""The Pareto experiment: config validation, frontier, seed aggregation, and a tiny end-to-end run."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ponderlm.errors import ConfigError
from ponderlm.experiments import ExperimentConfig, evaluation, run_experiment
from ponderlm.experiments import runner as pareto
from ponderlm.experiments.report import collect_points, markdown, pareto_front

from errorcases import answer_ctrl_c
from fakepkgs import build_fake_dataset

REPO = Path(__file__).parents[1]


def test_pareto_front():
    pts = [(1.0, 5.0), (2.0, 4.0), (2.5, 4.5), (3.0, 3.0), (0.5, 6.0), (3.0, 3.5)]
    assert pareto_front(pts) == [4, 0, 1, 3]


def test_collect_points_averages_seeds():
    def res(run, seed, loss):
        return {"run": run, "seed": seed, "method": "ponderlm3", "K": 2, "penalty_weight": 0.1,
                "evals": [{"tau": 0.1, "loss": loss, "mean_depth": 1.0, "flops_per_token": 10.0}]}  # fmt: skip

    pts = collect_points([res("a", 0, 2.0), res("a", 1, 3.0)])
    assert len(pts) == 1 and pts[0]["seeds"] == 2
    assert pts[0]["loss"] == 2.5 and pts[0]["loss_std"] == pytest.approx(0.5**0.5)
    assert pts[0]["pareto"]


@pytest.mark.parametrize("name", ["cpu", "cpu_baselines", "cpu_text", "gpu_70m", "gpu_410m", "difficulty"])
def test_experiment_presets_load(name):
    cfg = ExperimentConfig.load(REPO / "configs" / "experiments" / f"{name}.yaml")
    for run in cfg.runs:
        rc = cfg.run_config(run, cfg.seeds[0])
        assert Path(rc.train.out_dir).parent == Path(cfg.out_dir)
    methods = {cfg.run_config(r, 0).model.method for r in cfg.runs}
    assert {"vanilla", "ponderlm2", "ponderlm3"} <= methods
    if name == "cpu_baselines":
        assert methods == {"vanilla", "pause", "loop", "ponderlm1", "ponderlm2", "ponderlm3"}


def _grid(cfg: ExperimentConfig) -> list[tuple]:
    """What an experiment compares, shape aside: per run its method, K, penalty, seeds, and depth
    relative to the base model (the deeper vanillas)."""
    base_layers = cfg.run_config(cfg.runs[0], cfg.seeds[0]).model.n_layers
    out = []
    for r in cfg.runs:
        m = cfg.run_config(r, cfg.run_seeds(r)[0]).model
        out.append((m.method, m.max_ponder_steps, m.penalty_weight, tuple(cfg.run_seeds(r)), m.n_layers / base_layers))
    return out


@pytest.mark.parametrize("name", ["gpu_70m", "gpu_410m"])
def test_gpu_presets_run_the_cpu_text_grid_with_the_release_settings(name):
    """The GPU presets are cpu_text.yaml's grid and evaluation at other shapes, with the PonderLM-2
    release's model settings (RMSNorm eps 0.1, J from {2,3,4} for the GPT-NeoX-sized grid and
    {2,3} for the Llama one, every pass backpropagated, reference init, bf16)."""
    cpu = ExperimentConfig.load(REPO / "configs" / "experiments" / "cpu_text.yaml")
    gpu = ExperimentConfig.load(REPO / "configs" / "experiments" / f"{name}.yaml")
    assert _grid(gpu) == _grid(cpu)
    assert {2.0, 3.0} <= {g[-1] for g in _grid(cpu)}  # the 2x and 3x deeper vanillas
    for key in ("taus", "test_splits", "ablations", "ablation_taus"):  # references name other-depth runs
        assert getattr(gpu, key) == getattr(cpu, key), key
    rc = gpu.run_config(gpu.runs[0], 0)
    assert rc.model.norm_eps == 0.1 and rc.model.init == "reference" and rc.model.jacobi_grad_passes == 0
    assert rc.model.jacobi_train_iters == ((2, 3, 4) if name == "gpu_70m" else (2, 3))
    assert rc.train.dtype == "bf16"


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"colour": 1}, "unknown experiment key(s) colour"),
        ({"runs": [{"name": "a"}, {"name": "a"}]}, "duplicate run names"),
        ({"runs": [{"name": "a", "set": ["model.d_modle=3"]}]}, "d_modle"),
        ({"taus": [2.0]}, "tau must be in the open interval"),
        ({"ablations": ["oracle"]}, "unknown ablation(s) oracle"),
        ({"runs": [{"name": "a", "seeds": []}]}, "seeds must be a non-empty list"),
        ({"test_splits": ["val"]}, "test_splits must name other held-out splits than train and val"),
        ({"ablation_taus": [0.0]}, "tau must be in the open interval"),
        ({"references": ["vanilla"]}, "references name no run of the experiment: vanilla"),
        ({"test_splits": ["ptb_test", "ptb_test"]}, "once each"),
    ],
)
def test_experiment_config_errors(tmp_path, patch, needle):
    raw = {"name": "x", "out_dir": str(tmp_path), "base": {}, "runs": [{"name": "v"}], **patch}
    p = tmp_path / "e.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        ExperimentConfig.load(p)


def test_tiny_experiment_end_to_end_and_reuse(tmp_path, monkeypatch):
    data = build_fake_dataset(tmp_path / "d")
    raw = {
        "name": "tiny",
        "out_dir": str(tmp_path / "exp"),
        "base": {
            "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_ponder_steps": 2},
            "train": {
                "data_dir": str(data),
                "seq_len": 32,
                "batch_size": 4,
                "max_steps": 3,
                "eval_windows": 4,
                "progress": False,
                "log_interval": 1,
            },
        },
        "runs": [
            {"name": "v", "set": ["model.method=vanilla"], "seeds": [0, 1]},
            {"name": "p3", "set": ["model.method=ponderlm3"]},
        ],
        "taus": [1e-4, 0.4],
        "eval_windows": 4,
        "ablations": ["fixed", "random"],
    }
    p = tmp_path / "e.yaml"
    p.write_text(yaml.safe_dump(raw))
    logs: list[str] = []
    out = run_experiment(ExperimentConfig.load(p), tmp_path / "cache", log=logs.append)
    main = [pt for pt in out["points"] if pt["ablation"] is None]
    assert len(main) == 1 + 2  # vanilla once (2 seeds), PonderLM-3 at each tau
    assert [pt["seeds"] for pt in main if pt["run"] == "v"] == [2]
    assert (tmp_path / "exp" / "v").is_dir() and (tmp_path / "exp" / "v-s1").is_dir()
    abl = sorted(pt["run"] for pt in out["points"] if pt["ablation"] is not None)
    assert abl == ["p3 [fixed d=0]", "p3 [fixed d=1]", "p3 [fixed d=2]", "p3 [random]", "p3 [random]"]
    assert not any(pt["pareto"] for pt in out["points"] if pt["ablation"])
    assert any(pt["pareto"] for pt in main)
    for f in ("pareto.md", "pareto.json", "pareto.png"):
        assert (tmp_path / "exp" / f).is_file()
    saved = json.loads((tmp_path / "exp" / "pareto.json").read_text())
    assert {pt["run"] for pt in saved["points"] if pt["ablation"] is None} == {"v", "p3"}
    logs.clear()

    def no_eval(*a, **k):
        raise AssertionError("evaluation should come from experiment_eval.json")

    monkeypatch.setattr(evaluation, "evaluate_run", no_eval)
    again = run_experiment(ExperimentConfig.load(p), tmp_path / "cache", log=logs.append)
    assert sum("reusing it" in line for line in logs) == 3
    assert again["points"] == out["points"]
    # --eval-only reports the finished runs and leaves the others out, training nothing
    raw["runs"].append({"name": "new", "set": ["model.method=ponderlm2"]})
    p.write_text(yaml.safe_dump(raw))
    part = run_experiment(ExperimentConfig.load(p), tmp_path / "cache", log=logs.append, eval_only=True)
    assert not (tmp_path / "exp" / "new").exists()
    assert "Not finished, left out: new." in (tmp_path / "exp" / "pareto.md").read_text()
    assert len(part["points"]) == len(out["points"])


def _labelled(run, seed, flops, accs, depth=0.0):
    """A result row on a labelled dataset: accs = (answer-1, answer-2) accuracy, 10 and 30 tokens."""
    classes = {"syntax": {"tokens": 50, "loss": 0.1, "acc": 0.9, "mean_depth": depth},
               "free": {"tokens": 40, "loss": 3.0, "acc": 0.1, "mean_depth": depth},
               "answer-1": {"tokens": 10, "loss": 1.0, "acc": accs[0], "mean_depth": depth},
               "answer-2": {"tokens": 30, "loss": 1.5, "acc": accs[1], "mean_depth": depth}}  # fmt: skip
    diff = {
        "answer_tokens": 40,
        "spearman_depth_d": None,
        "mean_depth": {"answer": depth, "free": depth, "syntax": depth},
    }
    return {"run": run, "seed": seed, "method": "vanilla", "K": 0, "penalty_weight": None, "router": False,
            "evals": [{"tau": 1e-4, "loss": 2.0, "mean_depth": depth, "flops_per_token": flops, "classes": classes,
                       "difficulty": diff}]}  # fmt: skip


def test_collect_points_pools_answer_classes_and_marks_accuracy_frontiers():
    pts = {p["run"]: p for p in collect_points([
        _labelled("small", 0, 1e6, (0.5, 0.1)), _labelled("small", 1, 1e6, (0.7, 0.3)),
        _labelled("big", 0, 2e6, (0.9, 0.2)),  # better on all answers pooled, worse on the hardest
        _labelled("waste", 0, 3e6, (0.6, 0.2)),  # beaten by "big" on both, at more cost
    ])}  # fmt: skip
    small = pts["small"]
    assert small["class_acc"]["answer-1"] == pytest.approx(0.6) and small["class_acc_std"]["answer-1"] == pytest.approx(
        0.02**0.5
    )
    # pooled per seed, weighted by tokens: (10 * 0.5 + 30 * 0.1) / 40 = 0.2 and (7 + 9) / 40 = 0.4
    assert small["answer_acc"] == pytest.approx(0.3) and small["answer_acc_std"] == pytest.approx(0.02**0.5)
    assert small["hardest"] == "answer-2" and small["hardest_acc"] == pytest.approx(0.2)
    assert pts["big"]["answer_acc"] == pytest.approx((9 + 6) / 40)
    assert [pts[r]["pareto_answer"] for r in ("small", "big", "waste")] == [True, True, False]
    assert [pts[r]["pareto_hardest"] for r in ("small", "big", "waste")] == [True, False, False]
    md = markdown("t", list(pts.values()))
    # two seeds: the 95% half-width is t(1) * std / sqrt(2) = 12.706 * 0.1414 / 1.4142 = 1.271
    assert small["answer_acc_ci95"] == pytest.approx(1.2706) and pts["big"]["answer_acc_ci95"] is None
    assert (
        "| small |  | 2 | 1.000 | 0.300 | 0.141 | 1.271 | 0.200 | 0.141 | 1.271 | 0.600 | 0.200 | 3.000 | 0.100 |" in md
    )


def test_collect_points_without_labels_has_no_accuracy_keys():
    row = {"tau": 1e-4, "loss": 2.0, "mean_depth": 0.0, "flops_per_token": 1.0}
    pts = collect_points([{"run": "v", "seed": 0, "method": "vanilla", "K": 0, "penalty_weight": None, "evals": [row]}])
    assert "answer_acc" not in pts[0] and "pareto_answer" not in pts[0]
    assert "Accuracy per class" not in markdown("t", pts)


def test_run_placeholders_name_the_same_seeds_earlier_run(tmp_path):
    p2 = {"name": "p2", "set": ["model.method=ponderlm2", "train.init_from={run:base}"]}
    raw = {"name": "x", "out_dir": str(tmp_path / "e"), "base": {}, "seeds": [0, 3], "runs": [{"name": "base"}, p2]}
    p = tmp_path / "e.yaml"
    p.write_text(yaml.safe_dump(raw))
    cfg = ExperimentConfig.load(p)
    p2 = cfg.runs[1]
    assert cfg.run_config(p2, 0).train.init_from == str(tmp_path / "e" / "base")
    assert cfg.run_config(p2, 3).train.init_from == str(tmp_path / "e" / "base-s3")
    assert [(s, r["name"]) for s, r in cfg.jobs()] == [(0, "base"), (0, "p2"), (3, "base"), (3, "p2")]


@pytest.mark.parametrize(
    "runs, needle",
    [
        ([{"name": "a", "set": ["train.init_from={run:b}"]}, {"name": "b"}],
         "{run:b} must name a run listed before it"),
        ([{"name": "a", "set": ["train.init_from={run:nope}"]}], "{run:nope} must name a run listed before it"),
        ([{"name": "b", "seeds": [1]}, {"name": "a", "set": ["train.init_from={run:b}"]}],
         "{run:b} is not trained with seed 0"),
    ],
)  # fmt: skip
def test_run_placeholders_are_checked_when_the_file_loads(tmp_path, runs, needle):
    p = tmp_path / "e.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "out_dir": str(tmp_path), "base": {}, "runs": runs}))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        ExperimentConfig.load(p)


# ------------------------------------------------------------------ --jobs N: training in worker processes
def _jobs_experiment(tmp_path: Path, out: str, runs: list[dict], seeds: list[int], steps: int = 3) -> Path:
    """A tiny experiment file (one thread per training, so that any two trainings of a run agree)."""
    data = tmp_path / "d" / "ds"
    if not data.exists():
        build_fake_dataset(tmp_path / "d")
    raw = {
        "name": out,
        "out_dir": str(tmp_path / out),
        "base": {
            "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_ponder_steps": 2},
            "train": {"data_dir": str(data), "seq_len": 32, "batch_size": 4, "max_steps": steps, "eval_windows": 2,
                      "progress": False, "log_interval": 1, "threads": 1},
        },
        "runs": runs,
        "seeds": seeds,
        "taus": [0.4],
        "eval_windows": 2,
    }  # fmt: skip
    p = tmp_path / f"{out}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


DEPENDENT_RUNS = [
    {"name": "base", "set": ["model.method=vanilla"]},
    {"name": "p2", "set": ["model.method=ponderlm2", "train.init_from={run:base}"]},
    {"name": "p3", "set": ["model.method=ponderlm3"]},
]


def test_jobs_trains_in_workers_after_their_init_from_run(tmp_path):
    threads = torch.get_num_threads()
    try:
        par_logs: list[str] = []
        spec = _jobs_experiment(tmp_path, "par", DEPENDENT_RUNS, [0, 1])
        par = run_experiment(ExperimentConfig.load(spec), tmp_path / "cache", log=par_logs.append, jobs=2)
        seq = run_experiment(ExperimentConfig.load(_jobs_experiment(tmp_path, "seq", DEPENDENT_RUNS, [0, 1])),
                             tmp_path / "cache", log=lambda *_: None)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "par"
    names = ["base", "p2", "p3", "base-s1", "p2-s1", "p3-s1"]
    for name in names:
        assert pareto.finished(out / name, 3), name
        assert (out / ".logs" / f"{name}.log").is_file(), name
    assert (out / "pareto.md").is_file() and (out / "pareto.json").is_file()
    for name, base in (("p2", "base"), ("p2-s1", "base-s1")):
        assert f"initialised from {out / base}" in (out / ".logs" / f"{name}.log").read_text()
    # started in cfg.jobs() order, a dependent run only once its base run has finished
    started = [line.split()[3] for line in par_logs if " in worker " in line]
    assert started[:2] == ["base", "p3"] and sorted(started) == sorted(names)  # p2 waits for base
    ended = {line.split()[2]: i for i, line in enumerate(par_logs) if line.startswith("== [") and "trained" in line}
    for name, base in (("p2", "base"), ("p2-s1", "base-s1")):
        begun = next(i for i, line in enumerate(par_logs) if f" training {name} (" in line)
        assert ended[base] < begun
    # evaluation found every run finished; the report is the one of the same runs trained one after the other
    assert sum("reusing it" in line for line in par_logs) == 6
    assert par["points"] == seq["points"]
    assert all(math.isfinite(pt["loss"]) for pt in par["points"])


def test_jobs_failure_names_the_run_and_its_log_and_starts_no_dependent(tmp_path):
    runs = [
        {"name": "base", "set": ["model.method=vanilla"]},
        {"name": "bad", "set": ["model.method=vanilla", f"train.data_dir={tmp_path / 'nodata'}"]},
        {"name": "dep", "set": ["model.method=ponderlm2", "train.init_from={run:bad}"]},
    ]
    spec = _jobs_experiment(tmp_path, "exp", runs, [0])
    out = tmp_path / "exp"
    log = out / ".logs" / "bad.log"
    why = f"{tmp_path / 'nodata'} is not a prepared dataset (no meta.json)"
    with pytest.raises(ConfigError, match=re.escape(f"training bad failed ({why}")) as e:
        run_experiment(ExperimentConfig.load(spec), tmp_path / "cache", log=lambda *_: None, jobs=2)
    assert str(e.value).endswith(f"its log: {log}; not started: dep. The runs that finished are kept: run the "
                                 "command again to continue")  # fmt: skip
    assert f"error: {why}" in log.read_text()
    assert pareto.finished(out / "base", 3)  # the job running beside it finished, and is kept
    assert not (out / "dep").exists() and not (out / ".logs" / "dep.log").exists()
    assert not (out / "pareto.md").exists()


def test_jobs_ctrl_c_stops_the_workers(tmp_path):
    """SIGINT to the parent alone (as a signal sent to the command, not the terminal's process group):
    it stops its workers, which are gone when it has exited."""
    runs = [{"name": "a", "set": ["model.method=vanilla"]}, {"name": "b", "set": ["model.method=vanilla"]}]
    spec = _jobs_experiment(tmp_path, "exp", runs, [0], steps=100000)
    p = subprocess.Popen([sys.executable, "-m", "ponderlm", "experiment", "pareto", "--config", str(spec), "--jobs",
                          "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         preexec_fn=answer_ctrl_c)  # fmt: skip
    try:
        pids = []
        while len(pids) < 2:
            line = p.stdout.readline()
            assert line, p.stderr.read()
            if " in worker " in line:
                pids.append(int(line.split(" in worker ")[1].split(",")[0]))
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 130
    finally:
        if p.poll() is None:
            p.kill()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_run_stopped_before_its_first_checkpoint_is_started_again(tmp_path):
    """A run directory with its config but no checkpoint yet (stopped early) is trained again from
    step 0 by the next experiment command, without --overwrite."""
    spec = _jobs_experiment(tmp_path, "exp", [{"name": "v", "set": ["model.method=vanilla"]}], [0])
    run_experiment(ExperimentConfig.load(spec), tmp_path / "cache", log=lambda *_: None)
    run = tmp_path / "exp" / "v"
    for ck in (run / "checkpoints").iterdir():
        shutil.rmtree(ck)
    assert (run / "config.yaml").is_file() and not pareto.finished(run, 3)
    logs: list[str] = []
    run_experiment(ExperimentConfig.load(spec), tmp_path / "cache", log=logs.append)
    assert pareto.finished(run, 3)
    assert any("resuming v" in line for line in logs)


def test_t_interval_of_a_mean_over_seeds():
    from ponderlm.eval.stats import ci95, t975

    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042
    assert t975(31) == pytest.approx(2.0395, abs=1e-3) and t975(120) == pytest.approx(1.9799, abs=1e-3)
    assert ci95([1.0]) is None and ci95([2.0, 2.0, 2.0]) == 0.0
    xs = [1.0, 2.0, 3.0]  # std 1, n 3: 4.303 / sqrt(3)
    assert ci95(xs) == pytest.approx(4.303 / 3**0.5)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def test_test_splits_are_scored_in_workers_and_reported_against_vanilla(tmp_path):
    """--jobs 2 trains and evaluates in the workers; each point carries the test split's loss; the
    random ablation runs at its own tau only; the report compares every configuration with vanilla;
    --eval-only --jobs 2 recomputes a missing evaluation in a worker and trains nothing."""
    runs = [{"name": "vanilla", "set": ["model.method=vanilla"], "seeds": [0, 1]},
            {"name": "p3", "set": ["model.method=ponderlm3"]}]  # fmt: skip
    spec = _jobs_experiment(tmp_path, "exp", runs, [0])
    raw = yaml.safe_load(spec.read_text())
    splits = json.loads((Path(raw["base"]["train"]["data_dir"]) / "meta.json").read_text())["splits"]
    test = next(s for s in splits if s not in ("train", "val"))
    raw.update(
        test_splits=[test], taus=[1e-4, 0.4], ablations=["random"], ablation_taus=[0.4], references=["vanilla", "p3"]
    )
    spec.write_text(yaml.safe_dump(raw))
    logs: list[str] = []
    out = run_experiment(ExperimentConfig.load(spec), tmp_path / "cache", log=logs.append, jobs=2)
    exp = tmp_path / "exp"
    for name in ("vanilla", "vanilla-s1", "p3"):
        saved = json.loads((exp / name / "experiment_eval.json").read_text())
        assert saved["key"]["test_splits"] == [test]
        row = saved["result"]["evals"][0]
        assert math.isfinite(row["splits"][test]["loss"]) and row["splits"][test]["tokens"] > 0
        assert 0 < saved["result"]["epoch_fraction"] < 1
        assert f"evaluating {exp / name}" in (exp / ".logs" / f"{name}.log").read_text()
    assert sum("trained and evaluated" in line for line in logs) == 3
    van = next(p for p in out["points"] if p["run"] == "vanilla")
    assert van["seeds"] == 2 and len(van["splits"][test]["loss_seeds"]) == 2
    assert van["splits"][test]["loss_ci95"] > 0
    assert [(p["run"], p["tau"]) for p in out["points"] if p["ablation"]] == [("p3 [random]", 0.4)]
    md = (exp / "pareto.md").read_text()
    assert f"{test} loss" in md and "Against `vanilla` (2 seed(s))" in md and "Per seed: validation loss." in md
    assert "Against `p3` (1 seed(s))" in md
    # p3 has no interval: its differences are not resolved
    assert "| p3 | 0.4 | 1 |" in md and "| p3 | 0.0001 | 1 |" in md and "one seed" in md

    (exp / "p3" / "experiment_eval.json").unlink()
    logs.clear()
    again = run_experiment(ExperimentConfig.load(spec), tmp_path / "cache", log=logs.append, jobs=2, eval_only=True)
    assert [line for line in logs if " in worker " in line] and all(
        " evaluating p3 " in line for line in logs if " in worker " in line
    )
    assert (exp / "p3" / "experiment_eval.json").is_file()
    assert [p["run"] for p in again["points"]] == [p["run"] for p in out["points"]]


def test_a_test_split_the_dataset_lacks_is_refused_before_training(tmp_path):
    spec = _jobs_experiment(tmp_path, "exp", [{"name": "v", "set": ["model.method=vanilla"]}], [0])
    raw = yaml.safe_load(spec.read_text())
    raw["test_splits"] = ["wikitext_test"]
    spec.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"has no 'wikitext_test' split .*remove it from test_splits"):
        run_experiment(ExperimentConfig.load(spec), tmp_path / "cache", log=lambda *_: None)
    assert not (tmp_path / "exp" / "v").exists()


@pytest.mark.parametrize(
    "a, b, verdict",
    [((4.0, 0.1), (5.0, 0.1), "lower"), ((5.0, 0.1), (4.0, 0.1), "higher"), ((4.9, 0.2), (5.0, 0.2), "overlap"),
     ((4.0, None), (5.0, 0.1), "one seed")],
)  # fmt: skip
def test_a_difference_is_resolved_only_when_the_intervals_are_apart(a, b, verdict):
    from ponderlm.experiments.report import _verdict

    def pt(mean_ci):
        return {"loss": mean_ci[0], "loss_ci95": mean_ci[1]}

    assert _verdict(pt(a), pt(b)) == verdict


def test_the_paired_difference_uses_the_shared_seeds_and_can_resolve_what_the_intervals_do_not():
    from ponderlm.eval.stats import ci95
    from ponderlm.experiments.report import _paired_cells, _verdict, paired_difference

    # seed-to-seed spread of 0.1 shared by both runs, a constant gap of 0.05 (noise 0.01) on top
    a, b = [4.0, 3.9, 3.8], [4.05, 3.96, 3.84]
    m, h, n = paired_difference([0, 1, 2], a, [0, 1, 2], b)
    assert n == 3 and m == pytest.approx(-0.05) and h == pytest.approx(4.303 * 0.01 / 3**0.5, rel=1e-3)
    assert _paired_cells([0, 1, 2], a, [0, 1, 2], b)[1] == "lower"
    assert _paired_cells([0, 1, 2], b, [0, 1, 2], a)[1] == "higher"
    assert _verdict({"loss": sum(a) / 3, "loss_ci95": ci95(a)}, {"loss": sum(b) / 3, "loss_ci95": ci95(b)}) == "overlap"
    # only the seeds both have are paired, whatever their order
    m, _, n = paired_difference([2, 0, 5], [3.8, 4.0, 9.0], [0, 1, 2], b)
    assert n == 2 and m == pytest.approx(((4.0 - 4.05) + (3.8 - 3.84)) / 2)
    assert paired_difference([0], [4.0], [0, 1], [4.1, 4.2]) is None
    assert _paired_cells([0], [4.0], [0, 1], [4.1, 4.2]) == ["", "< 2 shared seeds"]
    # differences of opposite sign: the interval holds zero
    assert _paired_cells([0, 1, 2], [4.0, 4.0, 4.0], [0, 1, 2], [4.1, 3.9, 4.0])[1] == "overlap"


def test_tau_labels_cover_neither_each_other_nor_a_marker_and_stay_inside_the_axes():
    from ponderlm.experiments.figures import label_offsets

    def box(anchor, size, off):
        return (anchor[0] + off[0], anchor[1] + off[1], anchor[0] + off[0] + size[0], anchor[1] + off[1] + size[1])

    def apart(a, b):
        return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]

    # three labels crowded on nearly one spot, two other markers beside them, the axes' right edge close
    anchors = [(100.0, 100.0), (101.0, 102.0), (103.0, 99.0)]
    sizes = [(30.0, 6.0), (24.0, 6.0), (36.0, 6.0)]
    # a frontier ring (half-width 6.5) on the first point, ordinary markers elsewhere
    markers = [(*anchors[0], 6.5), (*anchors[1], 3.5), (*anchors[2], 3.5), (112.0, 110.0, 3.5), (90.0, 90.0, 3.5)]
    bounds = (0.0, 0.0, 140.0, 200.0)
    offs = label_offsets(anchors, sizes, markers, bounds=bounds)
    boxes = [box(a, sz, o) for a, sz, o in zip(anchors, sizes, offs, strict=True)]
    for i in range(3):
        assert bounds[0] <= boxes[i][0] and boxes[i][2] <= bounds[2], boxes[i]
        for j in range(i + 1, 3):
            assert apart(boxes[i], boxes[j]), (boxes[i], boxes[j])
        for mx, my, r in markers:
            assert apart(boxes[i], (mx - r, my - r, mx + r, my + r)), (boxes[i], (mx, my))


def test_experiment_train_trains_one_run_in_its_place_for_pareto_to_reuse(tmp_path, capsys):
    from ponderlm.cli.main import main

    runs = [
        {"name": "v", "set": ["model.method=vanilla"], "seeds": [0, 1]},
        {"name": "p3", "set": ["model.method=ponderlm3"]},
    ]
    spec = _jobs_experiment(tmp_path, "exp", runs, [0])
    assert main(["experiment", "train", "--config", str(spec), "--run", "v", "--seed", "1"]) == 0
    out = tmp_path / "exp"
    assert pareto.finished(out / "v-s1", 3) and not (out / "v").exists() and not (out / "p3").exists()
    capsys.readouterr()
    assert main(["experiment", "train", "--config", str(spec), "--run", "v", "--seed", "1"]) == 0
    assert "is finished (step 3); nothing to train" in capsys.readouterr().out
    logs: list[str] = []
    part = run_experiment(ExperimentConfig.load(spec), tmp_path / "cache", log=logs.append, eval_only=True)
    assert any("v-s1: finished run found, reusing it" in line for line in logs)
    assert [(p["run"], p["seed_list"]) for p in part["points"]] == [("v", [1])]


def test_each_test_split_gets_its_own_frontier():
    """A point can be on the validation frontier and off a test split's (and the reverse)."""

    def res(run, flops, val, test):
        return {"run": run, "seed": 0, "method": "vanilla", "K": 0, "penalty_weight": None, "router": False,
                "evals": [{"tau": 1e-4, "loss": val, "mean_depth": 0.0, "flops_per_token": flops,
                           "splits": {"ptb_test": {"loss": test, "mean_depth": 0.0, "tokens": 10}}}]}  # fmt: skip

    pts = {p["run"]: p for p in collect_points([res("a", 1.0, 5.0, 6.0), res("b", 2.0, 4.0, 6.5)])}
    assert pts["a"]["pareto"] and pts["b"]["pareto"]
    assert pts["a"]["pareto_ptb_test"] and not pts["b"]["pareto_ptb_test"]
    assert pts["b"]["ptb_test_loss"] == 6.5 and pts["b"]["splits"]["ptb_test"]["ppl"] == pytest.approx(math.exp(6.5))


# the quickstart of 2026-11-28 (docs/LOG.md): one seed each; PonderLM-3's tau=0.2 point lies far above the rest
QUICKSTART = [("vanilla", "vanilla", [(1e-4, 5.2908, 0.0, 1.279)]),
              ("ponderlm2", "ponderlm2", [(1e-4, 5.3039, 2.0, 1.937)]),
              ("ponderlm3", "ponderlm3", [(1e-4, 5.2897, 1.99, 1.934), (0.05, 5.2952, 0.97, 1.567),
                                          (0.2, 5.3374, 0.34, 1.373)])]  # fmt: skip


def _quickstart_points() -> list[dict]:
    return collect_points([
        {"run": run, "seed": 0, "method": method, "K": 0 if method == "vanilla" else 2, "router": method == "ponderlm3",
         "penalty_weight": 0.05 if method == "ponderlm3" else None,
         "evals": [{"tau": t, "loss": loss, "mean_depth": d, "flops_per_token": mf * 1e6} for t, loss, d, mf in evals]}
        for run, method, evals in QUICKSTART
    ])  # fmt: skip


def test_a_single_seed_has_no_std_in_the_tables():
    md = markdown("quickstart", _quickstart_points())
    assert "| vanilla | vanilla | 0 |  |  | 1 | 5.2908 |  |  | 198.50 | 0.00 | 1.279 | * |" in md
    assert "0.0000" not in md  # no "± std 0.0000" for one seed
    two = collect_points([{"run": "v", "seed": s, "method": "vanilla", "K": 0, "penalty_weight": None,
                           "evals": [{"tau": 1e-4, "loss": loss, "mean_depth": 0.0, "flops_per_token": 1.0}]}
                          for s, loss in ((0, 2.0), (1, 2.0))])  # fmt: skip
    assert "| v | vanilla | 0 |  |  | 2 | 2.0000 | 0.0000 | 0.0000 |" in markdown("t", two)  # two seeds: a std


def test_the_quickstart_picture_shows_every_point_with_its_tau_and_readable_ticks():
    import matplotlib.pyplot as plt
    from matplotlib.colors import rgb_to_hsv, to_rgb

    from ponderlm.experiments.figures import figure

    points = _quickstart_points()
    fig = figure(points, "quickstart")
    try:
        ax = fig.axes[0]
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for p in points:  # every point on the chart, none replaced by an arrow at the edge
            assert x0 < p["flops_per_token"] / 1e6 < x1 and y0 < p["loss"] < y1, p["run"]
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticklabels() if t.get_text() and x0 <= t.get_position()[0] <= x1]
        assert len(ticks) >= 3, [t.get_text() for t in ticks]
        renderer = fig.canvas.get_renderer()
        frame = ax.get_window_extent(renderer)
        taus = {a.get_text(): a.get_window_extent(renderer) for a in ax.texts}
        assert sorted(taus) == ["τ=0.0001", "τ=0.05", "τ=0.2"]  # every PonderLM-3 point with its tau
        for box in taus.values():
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        # the frontier's dashed line (vanilla across to PonderLM-3 at 1e-4) runs under no label
        (fx0, fy), (fx1, _) = ax.transData.transform([(1.279, 5.2908), (1.934, 5.2908)])
        for text, box in taus.items():
            assert not (box.y0 < fy < box.y1 and box.x0 < fx1 and fx0 < box.x1), text
        # every run's marker in a saturated colour (no pale tint)
        for line in ax.get_lines():
            if line.get_label() in ("vanilla", "ponderlm2", "ponderlm3"):
                assert rgb_to_hsv(to_rgb(line.get_color()))[1] > 0.5, line.get_label()
    finally:
        plt.close(fig)


def test_log_ticks_give_three_round_values_inside_the_axis():
    from ponderlm.experiments.figures import log_ticks, x_limits

    for xs in ([1.279, 1.937], [2.1, 7.4], [0.2, 1.2], [1.0, 1.0], [0.5, 900.0], [3.3, 3.4]):
        lo, hi = x_limits(xs)
        ticks = log_ticks(lo, hi)
        assert lo < min(xs) and max(xs) < hi
        assert len(ticks) >= 3 and all(lo <= t <= hi for t in ticks), (xs, ticks)
        assert all(len(f"{t:g}") <= 5 for t in ticks), ticks  # round numbers, short labels

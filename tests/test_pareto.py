"""The Pareto experiment: config validation, frontier, seed aggregation, and a tiny end-to-end run."""

import json
from pathlib import Path

import pytest
import yaml

from ponderlm.config import ConfigError
from ponderlm.experiments import ExperimentConfig, pareto, run_experiment
from ponderlm.experiments.report import collect_points, pareto_front

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


@pytest.mark.parametrize("name", ["cpu", "cpu_baselines", "gpu_70m", "gpu_410m"])
def test_experiment_presets_load(name):
    cfg = ExperimentConfig.load(REPO / "configs" / "experiments" / f"{name}.yaml")
    for run in cfg.runs:
        rc = cfg.run_config(run, cfg.seeds[0])
        assert Path(rc.train.out_dir).parent == Path(cfg.out_dir)
    methods = {cfg.run_config(r, 0).model.method for r in cfg.runs}
    assert {"vanilla", "ponderlm2", "ponderlm3"} <= methods
    if name == "cpu_baselines":
        assert methods == {"vanilla", "pause", "loop", "ponderlm1", "ponderlm2", "ponderlm3"}


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"colour": 1}, "unknown experiment key(s) colour"),
        ({"runs": [{"name": "a"}, {"name": "a"}]}, "duplicate run names"),
        ({"runs": [{"name": "a", "set": ["model.d_modle=3"]}]}, "d_modle"),
        ({"taus": [2.0]}, "tau must be in the open interval"),
        ({"ablations": ["oracle"]}, "unknown ablation(s) oracle"),
        ({"runs": [{"name": "a", "seeds": []}]}, "seeds must be a non-empty list"),
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

    monkeypatch.setattr(pareto, "evaluate_run", no_eval)
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

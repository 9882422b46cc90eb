"""Trainer: presets, schedule, exact resume (also after SIGKILL), 2-process torchrun equals 1 process,
clean CLI errors."""

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ponderlm.checkpoint import latest_checkpoint, load_checkpoint, verify_checkpoint
from ponderlm.config import ConfigError, TrainConfig, load_run_config
from ponderlm.model import PonderLM
from ponderlm.train import Trainer, lr_at, train

from fakepkgs import build_fake_dataset

REPO = Path(__file__).parents[1]
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.max_ponder_steps=2",
    "train.seq_len=32", "train.batch_size=8", "train.eval_windows=8", "train.log_interval=1",
    "train.progress=false", "train.warmup_steps=2", "train.lr=0.005",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_fake_dataset(tmp_path_factory.mktemp("train_data"))


def tiny_run(data_dir, out, *extra):
    return load_run_config(None, [*TINY, f"train.data_dir={data_dir}", f"train.out_dir={out}", *extra])


def train_losses(run_dir):
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.parametrize("name", ["tiny", "small", "pythia70m", "llama410m"])
def test_presets_load_and_build(name):
    cfg, explicit = load_run_config(REPO / "configs" / f"{name}.yaml")
    assert "model.d_model" in explicit
    with torch.device("meta"):
        model = PonderLM(cfg.model)
    n = model.num_parameters(exclude_embeddings=True)
    if name == "llama410m":
        assert cfg.model.d_model == 1024 and cfg.model.n_layers == 24 and cfg.model.d_ff == 2752
        assert 300e6 < n < 400e6  # non-embedding parameters of the 410M model


def test_lr_schedule():
    tc = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(5, tc) == 0.5 and lr_at(10, tc) == 1.0
    assert math.isclose(lr_at(60, tc), 0.55) and math.isclose(lr_at(110, tc), 0.1)
    lrs = [lr_at(s, tc) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


@pytest.mark.parametrize("method", ["vanilla", "ponderlm2", "ponderlm3"])
def test_training_learns_and_checkpoints(data_dir, tmp_path, method):
    cfg, ex = tiny_run(data_dir, tmp_path / "run", f"model.method={method}", "train.max_steps=30")
    res = train(cfg, ex, log=lambda *_: None)
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 30
    assert sum(list(losses.values())[-5:]) / 5 < sum(list(losses.values())[:5]) / 5 - 0.5
    ck = latest_checkpoint(tmp_path / "run")
    verify_checkpoint(ck)
    loaded = load_checkpoint(ck)
    assert loaded["trainer_state"]["step"] == 30 and loaded["model_config"].method == method
    assert loaded["model_config"].vocab_size == 448  # the tokenizer's 400 entries, rounded up to 64
    assert (ck / "tokenizer.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert res["val"]["loss"] < 6.0 and "flops_per_token" in res["val"]
    if method == "ponderlm3":
        assert "hard_depth_hist/0" in res["val"] and "soft_mean_depth" in res["val"]


def test_resume_continues_exactly(data_dir, tmp_path):
    cfg, ex = tiny_run(data_dir, tmp_path / "a", "train.max_steps=8", "train.ckpt_interval=4")
    train(cfg, ex, log=lambda *_: None)
    full = train_losses(tmp_path / "a")
    cfg, ex = tiny_run(data_dir, tmp_path / "b", "train.max_steps=8", "train.ckpt_interval=4")
    t = Trainer(cfg, ex, log=lambda *_: None)
    for step in range(1, 5):  # 4 steps, then a checkpoint, then "crash"
        t._record({"split": "train", "step": step, **t.train_step(step)})
        t.step = step
    t.save()
    t._record({"split": "train", "step": 5, "loss": 123.0})  # a line the crashed run wrote late
    t.close()  # "crash": the process is gone, so is its lock on the run directory
    cfg, ex = tiny_run(data_dir, tmp_path / "b", "train.max_steps=8", "train.ckpt_interval=4")
    train(cfg, ex, resume=True, log=lambda *_: None)
    assert train_losses(tmp_path / "b") == full  # bitwise equal, step for step


def _cli(*args):
    return [sys.executable, "-m", "ponderlm", *args]


def test_resume_after_sigkill_matches_uninterrupted(data_dir, tmp_path):
    common = [*TINY, f"train.data_dir={data_dir}", "train.max_steps=40", "train.ckpt_interval=2",
              "model.d_model=64", "model.n_layers=4", "model.d_ff=128"]  # fmt: skip
    ref = subprocess.run(_cli("train", *common, f"train.out_dir={tmp_path / 'ref'}"), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(_cli("train", *common, f"train.out_dir={run}"), **quiet)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoints" / "step_00000006").is_dir():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(train_losses(run))
    assert killed_at < 40
    res = subprocess.run(_cli("train", *common, f"train.out_dir={run}", "--resume"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert train_losses(run) == train_losses(tmp_path / "ref")


def test_torchrun_two_processes_match_one(data_dir, tmp_path):
    common = [*TINY, f"train.data_dir={data_dir}", "train.max_steps=6", "model.method=ponderlm3"]
    one = subprocess.run(_cli("train", *common, f"train.out_dir={tmp_path / 'one'}"), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ponderlm",
           "train", *common, f"train.out_dir={tmp_path / 'two'}"]  # fmt: skip
    two = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 6
    for s in a:
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])
    wa = load_checkpoint(latest_checkpoint(tmp_path / "one"))["model_state"]
    wb = load_checkpoint(latest_checkpoint(tmp_path / "two"))["model_state"]
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "nope.yaml"], "config file not found"),
        (["model.d_modle=3"], "Did you mean: 'd_model'"),
        (["train.lr=fast"], "could not be converted to Float"),
        (["model.n_heads=5"], "divisible by n_heads"),
        (["train.data_dir=/nonexistent"], "not a prepared dataset"),
    ],
)
def test_cli_errors_are_one_line(args, needle, tmp_path):
    r = subprocess.run(_cli("train", *args, f"train.out_dir={tmp_path / 'x'}"), capture_output=True, text=True)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_existing_run_needs_resume_or_overwrite(data_dir, tmp_path):
    cfg, ex = tiny_run(data_dir, tmp_path / "r", "train.max_steps=2")
    train(cfg, ex, log=lambda *_: None)
    cfg, ex = tiny_run(data_dir, tmp_path / "r", "train.max_steps=2")
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, ex, log=lambda *_: None)


def test_resume_with_a_different_number_of_processes(data_dir, tmp_path):
    """A 1-process run checkpointed at step 3 resumes under 2-process torchrun and ends where an
    uninterrupted 1-process run ends (the global batch of every step is the same)."""
    common = [*TINY, f"train.data_dir={data_dir}", "train.max_steps=6", "train.ckpt_interval=3"]
    ref = subprocess.run(_cli("train", *common, f"train.out_dir={tmp_path / 'ref'}"), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    cfg, ex = tiny_run(data_dir, tmp_path / "mixed", "train.max_steps=6", "train.ckpt_interval=3")
    t = Trainer(cfg, ex, log=lambda *_: None)
    for step in range(1, 4):
        t._record({"split": "train", "step": step, **t.train_step(step)})
        t.step = step
    t.save()
    t.close()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ponderlm",
           "train", *common, f"train.out_dir={tmp_path / 'mixed'}", "--resume"]  # fmt: skip
    two = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_losses(tmp_path / "ref"), train_losses(tmp_path / "mixed")
    assert a.keys() == b.keys()
    for s in a:
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])


def test_compiled_training_matches_eager(data_dir, tmp_path):
    cfg, ex = tiny_run(data_dir, tmp_path / "eager", "train.max_steps=3")
    train(cfg, ex, log=lambda *_: None)
    cfg, ex = tiny_run(data_dir, tmp_path / "compiled", "train.max_steps=3", "train.compile=true")
    train(cfg, ex, log=lambda *_: None)
    a, b = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-4 for s in a)


@pytest.mark.parametrize("grad_passes", [0, 1])
def test_bf16_autocast_trains_on_cpu(data_dir, tmp_path, grad_passes):
    """train.dtype=bf16 runs on CPU too (autocast; fp32 master weights and optimizer state), alone and
    with truncated backprop; its losses fall and stay close to the fp32 run's."""
    fp32, ex = tiny_run(data_dir, tmp_path / "fp32", "train.max_steps=6", "model.method=ponderlm3")
    train(fp32, ex, log=lambda *_: None)
    cfg, ex = tiny_run(data_dir, tmp_path / "bf16", "train.max_steps=6", "model.method=ponderlm3", "train.dtype=bf16",
                       f"model.jacobi_grad_passes={grad_passes}")  # fmt: skip
    train(cfg, ex, log=lambda *_: None)
    a, b = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    assert all(math.isfinite(v) for v in b.values()) and b[6] < b[1]
    if grad_passes == 0:
        assert all(abs(a[s] - b[s]) < 0.05 for s in a)  # the same computation, in another precision
    ck = sorted((tmp_path / "bf16" / "checkpoints").iterdir())[-1]
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(str(ck / "model.safetensors")).values())

"""Trainer: presets, schedule, exact resume (also after SIGKILL, in one process and under FSDP2),
2-process torchrun (DDP and FSDP2) equals 1 process, clean CLI errors."""

import itertools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ponderlm.errors import ConfigError
from ponderlm.model.model import PonderLM
from ponderlm.runs.checkpoint import latest_checkpoint, load_checkpoint, verify_checkpoint
from ponderlm.runs.config import TrainConfig, load_run_config
from ponderlm.training.schedule import lr_at
from ponderlm.training.trainer import Trainer, train

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


def train_losses(run_dir, split="train"):
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == split}


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


def _train(launch, *args, env=None):
    """``ponderlm train ARGS``: in one process (launch "1") or under 2-process torchrun (gloo on CPU)
    with ``train.dist=launch`` ("ddp" or "fsdp"); one thread per process."""
    cmd = _cli("train", *args)
    if launch != "1":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ponderlm",
               "train", f"train.dist={launch}", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


# 6 steps with checkpoints at 2, 4, 6; two micro-batches per process (DDP's no_sync, FSDP2's
# accumulation); 5 validation windows: 2 processes score 3 and 2, in 2 and 1 micro-batches
RUN6 = [*TINY, "train.max_steps=6", "train.ckpt_interval=2", "train.micro_batch_size=2", "model.method=ponderlm3",
        "train.eval_windows=5", "train.dist_timeout_s=60"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """launch -> the run directory of RUN6 trained uninterrupted that way, trained on first use and
    shared by the tests that compare with it."""
    runs = {}

    def get(launch):
        if launch not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted_{launch}") / "run"
            r = _train(launch, *RUN6, f"train.data_dir={data_dir}", f"train.out_dir={out}")
            assert r.returncode == 0, r.stderr[-3000:]
            runs[launch] = out
        return runs[launch]

    return get


def final_weights(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))["model_state"]


@pytest.mark.parametrize("launch", ["1", "fsdp"])
def test_resume_after_sigkill_matches_uninterrupted(data_dir, tmp_path, uninterrupted, launch):
    """SIGKILLed as step 6 begins (under torchrun rank 0 is killed and the launcher ends rank 1), a
    run has checkpoints 2 and 4 and step 5's metrics; --resume continues from step 4 and ends with
    the per-step losses and final weights of a run never interrupted, bit for bit."""
    run = tmp_path / "run"
    args = [*RUN6, f"train.data_dir={data_dir}", f"train.out_dir={run}"]
    killed = _train(launch, *args, env={"PONDERLM_FAULT": "rank0:6"})
    assert killed.returncode == (-signal.SIGKILL if launch == "1" else 1), killed.stderr[-3000:]
    assert latest_checkpoint(run).name == "step_00000004" and max(train_losses(run)) == 5
    resumed = _train(launch, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(run) == train_losses(uninterrupted(launch))
    a, b = final_weights(run), final_weights(uninterrupted(launch))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(uninterrupted, dist):
    """2 processes train what 1 trains (the same global batch): per-step losses, the validation
    loss and the final weights to 1e-6, the rounding of the cross-process reductions (measured: at
    most 4.8e-7, one float32 ulp of these losses, and 2.4e-7 in the weights)."""
    a, b = train_losses(uninterrupted("1")), train_losses(uninterrupted(dist))
    assert a.keys() == b.keys() == set(range(1, 7))
    for s in a:
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])
    va, vb = train_losses(uninterrupted("1"), split="val"), train_losses(uninterrupted(dist), split="val")
    assert va.keys() == vb.keys() == {6} and abs(va[6] - vb[6]) < 1e-6, (va, vb)
    wa, wb = final_weights(uninterrupted("1")), final_weights(uninterrupted(dist))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


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
    two = _train("ddp", *common, f"train.out_dir={tmp_path / 'mixed'}", "--resume")
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

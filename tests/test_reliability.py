"""Failure behaviour as a tested property: non-finite steps are skipped and counted, a streak of
them stops the run cleanly with its checkpoints intact, and loading never unpickles objects."""

import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ponderlm.errors import CheckpointError, TrainingStopped
from ponderlm.runs.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, verify_checkpoint
from ponderlm.runs.config import load_run_config
from ponderlm.training import trainer as train_mod
from ponderlm.training.trainer import Trainer, train

from fakepkgs import build_fake_dataset

TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.max_ponder_steps=2",
    "train.seq_len=32", "train.batch_size=4", "train.eval_windows=4", "train.log_interval=1", "train.progress=false",
    "train.warmup_steps=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_fake_dataset(tmp_path_factory.mktemp("rel_data"))


def config(data, out, *extra):
    return load_run_config(None, [*TINY, f"train.data_dir={data}", f"train.out_dir={out}", *extra])


def poison_loss(monkeypatch, bad_steps, where="loss"):
    """Make the loss (or one gradient) non-finite at the given steps of Trainer.train_step."""
    real_loss, real_step = train_mod.ponder_loss, Trainer.train_step
    current = {"step": 0}

    def step(self, s):
        current["step"] = s
        return real_step(self, s)

    def loss_fn(out, y, cfg):
        loss, metrics = real_loss(out, y, cfg)
        if current["step"] in bad_steps:
            if where == "loss":
                return loss * float("nan"), {**metrics, "loss": metrics["loss"] * float("nan")}
            out.logits.register_hook(lambda g: g * float("inf"))  # finite loss, non-finite gradient
        return loss, metrics

    monkeypatch.setattr(train_mod, "ponder_loss", loss_fn)
    monkeypatch.setattr(Trainer, "train_step", step)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_step_is_skipped_and_leaves_the_state_untouched(tmp_path, data, monkeypatch, where):
    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=4")
    poison_loss(monkeypatch, {2}, where)
    tr = Trainer(cfg, explicit, log=lambda *_: None)
    tr.train_step(1)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    opt_steps = [int(s["step"]) for s in tr.opt.state_dict()["state"].values()]
    row = tr.train_step(2)
    assert row["skipped"] == 1
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [int(s["step"]) for s in tr.opt.state_dict()["state"].values()] == opt_steps
    assert all(p.grad is None for p in tr.model.parameters())
    assert tr.train_step(3)["skipped"] == 0
    assert any(not torch.equal(v, before[k]) for k, v in tr.model.state_dict().items())
    tr.close()


def test_skipped_steps_are_logged_and_counted(tmp_path, data, monkeypatch):
    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=5")
    poison_loss(monkeypatch, {2, 3})
    logs = []
    train(cfg, explicit, log=logs.append)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r["split"] == "train" and r.get("skipped")]
    assert skipped == [2, 3]
    assert any("step 3: non-finite loss or gradient; step skipped (2 in a row, 2 in all)" in x for x in logs)
    bad = [r for r in rows if r.get("skipped")]
    assert all(r["loss"] is None and r["grad_norm"] is None for r in bad)  # strict JSON, no NaN literal
    ck = latest_checkpoint(tmp_path / "run")
    assert json.loads((ck / "trainer_state.json").read_text())["skipped_steps"] == 2


def test_a_streak_of_bad_steps_stops_cleanly_with_the_last_checkpoint_intact(tmp_path, data, monkeypatch):
    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=20", "train.ckpt_interval=2",
                           "train.max_bad_steps=2")  # fmt: skip
    poison_loss(monkeypatch, set(range(4, 100)))
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row at step 6"):
        train(cfg, explicit, log=lambda *_: None)
    ck = latest_checkpoint(tmp_path / "run")
    # steps 4 and 5 were skipped (weights untouched, so the step-4 checkpoint holds step 3's good
    # weights); step 6 stopped the run before anything else was written
    assert ck.name == "step_00000004"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    verify_checkpoint(ck)
    good = load_checkpoint(ck)["model_state"]
    assert all(torch.isfinite(v).all() for v in good.values())


class Boom:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path, data):
    """An attacker who rewrites optimizer.pt and its manifest entry still cannot run code."""
    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=1")
    train(cfg, explicit, log=lambda *_: None)
    ck = latest_checkpoint(tmp_path / "run")
    torch.save({"state": Boom()}, ck / "optimizer.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = hashlib.sha256((ck / "optimizer.pt").read_bytes()).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"refusing optimizer\.pt"):
        load_checkpoint(ck)
    (ck / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    manifest["files"]["model.safetensors"] = hashlib.sha256((ck / "model.safetensors").read_bytes()).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(ck, with_optimizer=False)


# ------------------------------------------------------------------ crash harness
def _losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _launch(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "ponderlm", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def _all_checkpoints_verify(run):
    for ck in list_checkpoints(run):
        verify_checkpoint(ck)  # raises if any visible checkpoint is half-written


def test_random_sigkills_and_a_kill_inside_a_checkpoint_write_lose_nothing(tmp_path, data):
    """Kill training at random moments (after random checkpoints, and once half-way through writing
    one), corrupt the newest checkpoint once, resume each time: per-step losses and final weights
    equal an uninterrupted run bit for bit, and no visible checkpoint is ever half-written."""
    rng = random.Random(1234)
    steps = 14
    common = [*TINY, f"train.data_dir={data}", f"train.max_steps={steps}", "train.ckpt_interval=1",
              "train.keep_last=2", "model.method=ponderlm3"]  # fmt: skip
    ref = tmp_path / "ref"
    r = _launch([*common, f"train.out_dir={ref}"])
    assert r.wait() == 0, r.stderr.read()
    run = tmp_path / "run"
    env = dict(os.environ, PONDERLM_FAULT=f"checkpoint:{rng.randint(2, 5)}")  # dies inside save_checkpoint
    p = _launch([*common, f"train.out_dir={run}"], env)
    assert p.wait() == -signal.SIGKILL
    assert list((run / "checkpoints").glob(".step_*.tmp")), "the kill should have left a half-built temporary"
    _all_checkpoints_verify(run)
    for _ in range(2):  # resume, then SIGKILL again after a random later checkpoint
        target = min(steps - 2, max(s for s in _losses(run)) + rng.randint(2, 4))
        p = _launch([*common, f"train.out_dir={run}", "--resume"])
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline:
            if (run / "checkpoints" / f"step_{target:08d}").is_dir():
                os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        assert p.wait() == -signal.SIGKILL, "the run should have been killed before it finished"
        _all_checkpoints_verify(run)
    newest = list_checkpoints(run)[-1]  # a disk error on the newest checkpoint: resume falls back
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:100])
    p = _launch([*common, f"train.out_dir={run}", "--resume"])
    assert p.wait() == 0, p.stderr.read()
    assert not list((run / "checkpoints").glob(".step_*"))  # no half-built or half-deleted leftovers
    assert _losses(run) == _losses(ref)
    a = load_checkpoint(latest_checkpoint(run))["model_state"]
    b = load_checkpoint(latest_checkpoint(ref))["model_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_when_one_rank_dies_the_others_exit_promptly_and_the_run_resumes_on_one(tmp_path, data):
    """Rank 1 is SIGKILLed at step 4 of a 2-process torchrun: the launch ends (no hang) with a
    failure; the run then resumes in one process from its last checkpoint and finishes with the
    losses of an uninterrupted single-process run (to float tolerance: 2-process reductions differ
    in rounding)."""
    common = [*TINY, f"train.data_dir={data}", "train.max_steps=6", "train.ckpt_interval=2",
              "train.dist_timeout_s=60", f"train.out_dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PONDERLM_FAULT": "rank1:4"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ponderlm",
           "train", *common]  # fmt: skip
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and time.time() - t0 < 120, r.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
    resumed = subprocess.run([sys.executable, "-m", "ponderlm", "train", *common, "--resume"], capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    ref_cfg, ex = config(data, tmp_path / "ref", "train.max_steps=6")
    train(ref_cfg, ex, log=lambda *_: None)
    a, b = _losses(tmp_path / "run"), _losses(tmp_path / "ref")
    assert a.keys() == b.keys() == set(range(1, 7))
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a)


def test_pruning_old_checkpoints_never_exposes_a_half_deleted_one(tmp_path, data, monkeypatch):
    """keep_last deletes old checkpoints; a kill half-way through that deletion (simulated by a
    failing rmtree) leaves only a hidden .del directory, which resume removes."""
    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=3", "train.ckpt_interval=1", "train.keep_last=1")
    import ponderlm.runs.checkpoint as ck_mod

    real = ck_mod.shutil.rmtree

    def dies_half_way(path, *a, **k):
        if str(path).endswith(".del"):
            (Path(path) / "model.safetensors").unlink()  # part of it is gone, then "the process dies"
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(ck_mod.shutil, "rmtree", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, explicit, log=lambda *_: None)
    monkeypatch.setattr(ck_mod.shutil, "rmtree", real)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.glob(".step_*.del")] == [".step_00000001.del"]
    for ck in list_checkpoints(tmp_path / "run"):
        verify_checkpoint(ck)  # every visible checkpoint is whole
    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=3", "train.ckpt_interval=1", "train.keep_last=1")
    train(cfg, explicit, resume=True, log=lambda *_: None)
    assert not list(root.glob(".step_*")) and [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000003"]


# ------------------------------------------------------------------ what ponderlm never does
def test_two_trainers_on_one_out_dir_one_refused(tmp_path, data):
    """Two `ponderlm train` processes started on the same out_dir: one trains, the other exits with
    a one-line error naming the holder; the run and its metrics are the first one's alone."""
    args = [*TINY, f"train.data_dir={data}", "train.max_steps=300", "train.log_interval=50",
            f"train.out_dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = _launch(args, env)
    deadline = time.time() + 60
    while not (tmp_path / "run" / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the first run should still be training"
    second = subprocess.run([sys.executable, "-m", "ponderlm", "train", *args], capture_output=True, text=True,
                            env=env)  # fmt: skip
    assert first.wait() == 0, first.stderr.read()
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "is in use by another ponderlm process (pid " in lines[0], second.stderr
    assert f"pid {first.pid}" in lines[0]
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]  # fmt: skip
    assert steps == sorted(set(steps)) and steps[-1] == 300  # one writer: no interleaved or repeated rows
    assert not (tmp_path / ".run.lock").exists()  # released and removed


def test_non_finite_weights_are_never_saved(tmp_path, data, monkeypatch):
    """Weights that became non-finite (here: forced at step 2) are not written as a checkpoint;
    the run stops and its message names the checkpoint that really is intact."""
    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=3", "train.ckpt_interval=1")
    real_step = Trainer.train_step

    def step(self, s):
        row = real_step(self, s)
        if s == 2:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return row

    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(TrainingStopped) as e:
        train(cfg, explicit, log=lambda *_: None)
    ck1 = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert "step 2: weights are not finite" in str(e.value) and f"the last good checkpoint, {ck1}, is intact" in str(
        e.value
    )
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000001"]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(ck1)["model_state"].values())


def test_a_stop_before_any_checkpoint_says_so(tmp_path, data, monkeypatch):
    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=20", "train.max_bad_steps=1")
    poison_loss(monkeypatch, set(range(1, 100)))
    with pytest.raises(TrainingStopped, match="no checkpoint of this run was written yet"):
        train(cfg, explicit, log=lambda *_: None)
    assert not list_checkpoints(tmp_path / "run")


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, data):
    """A real full disk (a small tmpfs): the second checkpoint does not fit. The command stops with
    one line saying "disk full", exit 3; the first checkpoint verifies and no temporary is left."""
    from errorcases import try_mount_tmpfs, unmount

    probe = tmp_path / "probe"
    cfg, explicit = config(data, probe, "train.max_steps=1")
    train(cfg, explicit, log=lambda *_: None)
    size = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    try_mount_tmpfs(disk, f"size={int(size * 1.6) // 4096 * 4096 + 4096}")
    try:
        args = [*TINY, f"train.data_dir={data}", "train.max_steps=3", "train.ckpt_interval=1", "train.keep_last=3",
                f"train.out_dir={disk / 'run'}"]  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "ponderlm", "train", *args], capture_output=True, text=True)
        assert r.returncode == 3, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "disk full while writing checkpoint" in lines[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        cks = list_checkpoints(disk / "run")
        assert [p.name for p in cks] == ["step_00000001"] and "the last good checkpoint" in lines[0]
        verify_checkpoint(cks[0])
        assert not list((disk / "run" / "checkpoints").glob(".*"))  # no temporary filling the disk
    finally:
        unmount(disk)


def test_resume_tolerates_a_metrics_line_cut_short_by_a_crash(tmp_path, data):
    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=2", "train.ckpt_interval=1")
    train(cfg, explicit, log=lambda *_: None)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 3, "lo')  # the process died mid-write
    logs = []
    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=3", "train.ckpt_interval=1")
    train(cfg, explicit, resume=True, log=logs.append)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert any("dropped 1 unreadable line(s)" in x for x in logs)


def test_resume_at_max_steps_changes_nothing(tmp_path, data):
    from errorcases import snapshot

    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=2")
    train(cfg, explicit, log=lambda *_: None)
    before = snapshot(tmp_path)
    logs = []
    cfg, explicit = config(data, tmp_path / "run", "train.max_steps=2", "train.lr=0.5")
    assert train(cfg, explicit, resume=True, log=logs.append)["step"] == 2
    assert any("already at train.max_steps=2; nothing to do" in x for x in logs)
    assert snapshot(tmp_path) == before  # not even config.yaml was rewritten


def test_cuda_device_names_resolve_to_this_process_gpu(monkeypatch):
    """`train.device=cuda` (the documented value) becomes cuda:LOCAL_RANK and is passed to
    set_device with its index, on a mocked 2-GPU machine; a missing index or GPU is an error."""
    from ponderlm.device import resolve_device
    from ponderlm.errors import ConfigError
    from ponderlm.training.distributed import DistEnv

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = DistEnv("cuda")
    assert env.device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert DistEnv("auto").device == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="this machine has 2 GPU"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")

"""Threads on a shared machine: the rule that picks torch's intra-op threads from the free cores
(tested on injected core counts and loads, not on this machine), who decides when several do
(--threads, train.threads, OMP_NUM_THREADS, the rule), the one line every computing command prints
about it, and train's key=value overrides accepted anywhere on the command line."""

from __future__ import annotations

import time

import pytest
import torch
import yaml

from ponderlm import threads
from ponderlm.cli.main import build_parser

from errorcases import TINY, build_world, run_cli


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("threads"))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ the rule
@pytest.mark.parametrize(
    "cores, load, procs, want",
    [
        (2, 0.0, 1, 2),  # idle: every core
        (2, 1.0, 1, 1),  # one busy neighbour on 2 cores: the case that fell from ~3,500 to ~640 tokens/s
        (2, 0.4, 1, 2),  # a load under half a core is not a core taken
        (2, 0.6, 1, 1),
        (2, 5.0, 1, 1),  # overloaded: still one thread, never zero
        (16, 3.2, 1, 13),
        (16, 3.2, 2, 6),  # two torchrun ranks share the 13 free cores
        (1, 0.0, 4, 1),  # more processes than cores: one thread each
        (8, float("nan"), 1, 8),  # no load figure: the cores
    ],
)
def test_rule_takes_the_free_cores(cores, load, procs, want):
    assert threads.choose_threads(cores, load, procs).n == want


def test_the_reason_says_cores_load_and_free():
    assert threads.choose_threads(2, 1.0).line() == "threads: 1 (2 cores available, load 1.0 -> 1 free)"
    assert threads.choose_threads(16, 3.2, 2).reason == "16 cores available, load 3.2 -> 13 free, shared by 2 processes"


def test_who_decides(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "load_average", lambda: 1.2)
    assert threads.pick(3, "--threads", env={"OMP_NUM_THREADS": "2"}) == threads.Choice(3, "--threads")
    assert threads.pick(None, env={"OMP_NUM_THREADS": "2"}) == threads.Choice(2, "OMP_NUM_THREADS")
    assert threads.pick(None, env={"OMP_NUM_THREADS": "zero"}).n == 3  # unusable: the rule
    assert threads.pick(None, env={}) == threads.Choice(3, "4 cores available, load 1.2 -> 3 free")
    assert threads.pick(None, env={"LOCAL_WORLD_SIZE": "2"}).n == 1  # torchrun: per rank


def test_describe_states_what_torch_uses():
    threads.use(threads.Choice(1, "--threads"))
    assert threads.describe() == "threads: 1 (--threads)"
    torch.set_num_threads(2)  # changed behind its back: no stale reason
    assert threads.describe() == "threads: 2 (PyTorch's default)"


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize(
    "argv",
    [
        ["train"],
        ["quickstart"],
        ["eval", "--checkpoint", "r"],
        ["analyze", "--checkpoint", "r"],
        ["generate", "--checkpoint", "r"],
        ["experiment", "pareto", "--config", "e.yaml"],
        ["experiment", "train", "--config", "e.yaml", "--run", "a"],
        ["demo"],
    ],
)
def test_every_computing_command_takes_threads(argv):
    assert build_parser().parse_args([*argv, "--threads", "3"]).threads == 3


def _train(w, tmp_path, *extra: str):
    return run_cli(["train", *TINY, f"train.data_dir={w.ds}", f"train.out_dir={tmp_path / 'run'}", *extra], tmp_path)


def test_train_says_how_many_threads_and_who_chose(w, tmp_path, monkeypatch):
    r = _train(w, tmp_path, "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "threads: 1 (--threads)" in r.stdout.splitlines()
    r = _train(w, tmp_path, "train.threads=1", "--overwrite")
    assert "threads: 1 (train.threads)" in r.stdout.splitlines()
    # both: the command line wins, and the run's config records what it ran with
    r = _train(w, tmp_path, "train.threads=2", "--threads", "1", "--overwrite")
    assert "threads: 1 (--threads)" in r.stdout.splitlines()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["threads"] == 1
    # neither: the free cores of this (pretended) machine
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "load_average", lambda: 1.0)
    r = _train(w, tmp_path, "--overwrite")
    assert "threads: 1 (2 cores available, load 1.0 -> 1 free)" in r.stdout.splitlines()
    assert torch.get_num_threads() == 1


def test_eval_and_analyze_say_it_too(w, tmp_path):
    r = run_cli(["eval", "--checkpoint", str(w.run), "--tasks", "val", "--ppl-windows", "2", "--threads", "1",
                 "--out", str(tmp_path / "ev")], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "threads: 1 (--threads)" in r.stdout.splitlines()
    r = run_cli(["analyze", "--checkpoint", str(w.run), "--windows", "2", "--threads", "1",
                 "--out", str(tmp_path / "an")], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "threads: 1 (--threads)" in r.stdout.splitlines()


def test_generate_states_threads_on_its_stats_line(w, tmp_path):
    r = run_cli(["generate", "--checkpoint", str(w.run), "--prompt", "The", "--max-new-tokens", "2",
                 "--threads", "1"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "threads: 1 (--threads)" in r.stderr and "threads" not in r.stdout  # stdout is the completion alone


def test_overrides_are_taken_after_flags(w, tmp_path):
    """`ponderlm train --config C --resume train.max_steps=3` continues the run to step 3 (argparse alone
    refused the override that follows --resume)."""
    conf = tmp_path / "c.yaml"
    sections: dict = {"model": {}, "train": {}}
    for o in [*TINY, "model.max_seq_len=32", f"train.data_dir={w.ds}", f"train.out_dir={tmp_path / 'run'}"]:
        key, value = o.split("=", 1)
        sec, name = key.split(".")
        sections[sec][name] = yaml.safe_load(value)
    conf.write_text(yaml.safe_dump(sections))
    assert run_cli(["train", "--config", str(conf)], tmp_path).returncode == 0
    r = run_cli(["train", "--config", str(conf), "--resume", "train.max_steps=3", "--threads", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()


def test_other_work_is_the_machine_busy_time_less_our_own():
    a = threads.CpuSample(machine_busy=100.0, own=10.0, at=50.0)
    b = threads.CpuSample(machine_busy=101.5, own=10.5, at=51.0)  # 1.5 cores busy, 0.5 of them ours
    assert threads.busy_elsewhere(a, b) == pytest.approx(1.0)
    assert threads.busy_elsewhere(a, threads.CpuSample(100.2, 10.4, 51.0)) == 0.0  # never negative


def test_a_busy_neighbour_is_seen_at_once_and_our_own_work_is_not(tmp_path):
    """A process spinning beside us is one busy core within the tenth-of-a-second sample (the load
    average would take a minute to show it); a thread of ours spinning is not someone else's work."""
    import subprocess
    import sys
    import threading

    if threads.cpu_sample() is None:
        pytest.skip("no /proc/stat")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert threads.load_average() >= 0.6
    finally:
        spinner.kill()
        spinner.wait()
    stop = threading.Event()
    mine = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)], daemon=True)
    mine.start()
    try:
        a = threads.cpu_sample()
        time.sleep(0.3)
        b = threads.cpu_sample()
    finally:
        stop.set()
        mine.join()
    elapsed = b.at - a.at
    own, machine = (b.own - a.own) / elapsed, (b.machine_busy - a.machine_busy) / elapsed
    assert own >= 0.5  # os.times counts every thread of ours...
    assert threads.busy_elsewhere(a, b) == pytest.approx(max(0.0, machine - own))  # ...and that is taken out

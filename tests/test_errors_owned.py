"""Directories ponderlm owns (docs/ERRORS.md, first section of new cases): --overwrite replaces only
a verifiably-ponderlm directory that holds nothing else and never an input of the command; a
second process on a directory gets a one-line error naming the holder; --resume never starts over
silently; configs with non-finite numbers, binary or non-mapping files are refused; experiments
reuse a run only when its resolved config is the requested one. Each case runs the real command
line and checks nothing on disk was created, changed or removed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from errorcases import Case, build_world, check_case, hold_lock, try_mount_tmpfs, unmount
from errorcases import train_args as _train

SAME = ["model.max_seq_len=32"]  # the world's run was trained with this context


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("owned"))


# ------------------------------------------------------------------ builders (run in the case's scratch dir)
def _project(w, s):
    """A user's project folder that happens to hold a config.yaml."""
    (s / "proj" / "src").mkdir(parents=True)
    (s / "proj" / "config.yaml").write_text("name: my project\nversion: 3\n")
    (s / "proj" / "src" / "main.py").write_text("print('hello')\n")


def _run_with_notes(w, s):
    shutil.copytree(w.run, s / "run")
    (s / "run" / "notes.txt").write_text("my notes on this run\n")


def _copy_run(w, s):
    shutil.copytree(w.run, s / "run")


def _edited_model_config(w, s):
    """A run whose only checkpoint fails to verify: its model_config.json was edited by hand."""
    _copy_run(w, s)
    ck = next((s / "run" / "checkpoints").iterdir())
    cfg = json.loads((ck / "model_config.json").read_text())
    cfg["norm_eps"] = 1e-6
    (ck / "model_config.json").write_text(json.dumps(cfg))


def _other_tokenizer_dataset(w, s):
    """The world's dataset with a different BPE of the same size (400 entries) as its tokenizer."""
    from ponderlm.data.tokenizer import Tokenizer

    shutil.copytree(w.ds, s / "ds2")
    import random

    rng = random.Random(0)
    texts = [" ".join("".join(rng.choice("qxzjkvw") for _ in range(rng.randint(2, 7))) for _ in range(300))
             for _ in range(200)]  # fmt: skip
    tok = Tokenizer.train_bpe(texts, 400)
    assert tok.vocab_size == 400
    tok.save(s / "ds2" / "tokenizer.json")


def _wrong_shape_checkpoint(w, s):
    """A run whose checkpoint verifies but one of its tensors has another shape than its config."""
    import hashlib

    from safetensors.torch import load_file, save_file

    _copy_run(w, s)
    ck = next((s / "run" / "checkpoints").iterdir())
    state = load_file(str(ck / "model.safetensors"))
    state["norm.weight"] = state["norm.weight"][:-2].clone()
    save_file(state, str(ck / "model.safetensors"))
    mf = json.loads((ck / "manifest.json").read_text())
    mf["files"]["model.safetensors"] = hashlib.sha256((ck / "model.safetensors").read_bytes()).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(mf))


def _experiment(w, s, top: dict | None = None, **change):
    """An experiment file whose one run points at a copy of the world's finished run (``top``: more
    experiment keys)."""
    exp = s / "exp"
    exp.mkdir()
    shutil.copytree(w.run, exp / "base")
    base_cfg = yaml.safe_load((w.run / "config.yaml").read_text())
    model = {k: base_cfg["model"][k] for k in ("d_model", "n_layers", "n_heads", "d_ff", "max_ponder_steps",
                                                 "max_seq_len", "method")}  # fmt: skip
    model.update(change)
    train = {k: base_cfg["train"][k] for k in ("data_dir", "seq_len", "batch_size", "max_steps", "eval_windows")}
    doc = {"name": "t", "out_dir": str(exp), "base": {"model": model, "train": train}, "runs": [{"name": "base"}],
           **(top or {})}  # fmt: skip
    (s / "exp.yaml").write_text(yaml.safe_dump(doc))


def _write(name: str, data: bytes):
    def setup(w, s):
        (s / name).write_bytes(data)

    return setup


_holders: dict[str, object] = {}


def _locked(path_fn):
    def setup(w, s):
        d = path_fn(w, s)
        _holders[str(s)] = (hold_lock(d), d.parent / f".{d.name}.lock")

    return setup


def _release(w, s):
    p, lock_file = _holders.pop(str(s), (None, None))
    if p is not None:
        p.kill()
        p.wait()
        lock_file.unlink(missing_ok=True)  # the killed holder's stale lock file, so later cases see the world as built


def _mount_ro(w, s):
    try_mount_tmpfs(s / "ro", "ro,size=64k")


def _unmount_ro(w, s):
    unmount(s / "ro")


def _file(w, s):
    (s / "afile").write_text("a file, not a directory\n")


# ---------------------------------------------------------------------------------------------------- cases
CASES = [
    # --overwrite replaces only a run ponderlm made, holding nothing else
    Case("train_overwrite_project_dir", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={s / 'proj'}",
                                                            "--overwrite"),
         "is not a run made by ponderlm; ponderlm replaces only what it made: choose another train.out_dir",
         setup=_project),
    Case("train_overwrite_run_with_user_files", lambda w, s: _train(f"train.data_dir={w.ds}",
                                                                    f"train.out_dir={s / 'run'}", "--overwrite"),
         "holds files ponderlm did not write (notes.txt); ponderlm replaces only what it made", setup=_run_with_notes),
    Case("train_overwrite_a_dataset", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={w.tiny_ds}",
                                                          "--overwrite"),
         "ponderlm replaces only what it made: choose another train.out_dir"),
    Case("train_out_is_data_dir", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={w.ds}",
                                                      "--overwrite"),
         "is the input"),
    Case("train_out_inside_data_dir", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={w.ds / 'r'}"),
         "lies inside the input"),
    Case("train_out_contains_data_dir", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={w.root}",
                                                            "--overwrite"),
         "contains the input"),
    Case("train_init_from_is_out", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={w.run}",
                                                       f"--init-from={w.run}", "--overwrite"),
         "is the input"),
    Case("train_out_dir_is_file", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={s / 'afile'}"),
         "is a file; choose a directory", setup=_file),
    Case("train_out_dir_under_file", lambda w, s: _train(f"train.data_dir={w.ds}",
                                                         f"train.out_dir={s / 'afile' / 'run'}"),
         "is a file, not a directory", setup=_file),
    Case("train_out_read_only", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={s / 'ro' / 'run'}"),
         "read-only file system while locking", setup=_mount_ro, cleanup=_unmount_ro),
    # locks: a second process on the same directory
    Case("train_out_dir_locked", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={s / 'run'}"),
         "is in use by another ponderlm process (pid ", setup=_locked(lambda w, s: s / "run"), cleanup=_release),
    Case("train_resume_locked", lambda w, s: _train(*SAME, f"train.data_dir={w.ds}", f"train.out_dir={w.run}",
                                                    "--resume"),
         "wait for it to finish or choose another train.out_dir", setup=_locked(lambda w, s: w.run),
         cleanup=_release),
    Case("experiment_locked", lambda w, s: ["experiment", "pareto", "--config", str(s / "exp.yaml")],
         "is in use by another ponderlm process", setup=lambda w, s: (_experiment(w, s), _locked(
             lambda w, s: s / "exp")(w, s)), cleanup=_release),
    # --resume never starts over, never continues on other data, never rewrites a run it does not train
    Case("resume_no_verified_checkpoint", lambda w, s: _train(*SAME, f"train.data_dir={w.ds}",
                                                              f"train.out_dir={s / 'run'}", "--resume"),
         "verifies (newest: ", setup=_edited_model_config),
    Case("resume_other_tokenizer", lambda w, s: _train(*SAME, f"train.data_dir={s / 'ds2'}", f"train.out_dir={w.run}",
                                                       "--resume"),
         "--resume with a dataset tokenized differently from ", setup=_other_tokenizer_dataset),
    Case("resume_beyond_max_steps", lambda w, s: _train(*SAME, "train.max_steps=1", f"train.data_dir={w.ds}",
                                                        f"train.out_dir={w.run}", "--resume"),
         "is at step 2, beyond train.max_steps=1; nothing was changed"),
    Case("resume_not_a_run", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={w.foreign}", "--resume"),
         "is not a ponderlm run; nothing to resume"),
    Case("resume_wrong_shape", lambda w, s: _train(*SAME, f"train.data_dir={w.ds}", f"train.out_dir={s / 'run'}",
                                                   "--resume"),
         "checkpoint does not fit the model: norm.weight has shape (30,), the model config needs (32,)",
         setup=_wrong_shape_checkpoint),
    # numbers that are not numbers
    Case("nonfinite_lr", lambda w, s: _train("train.lr=inf", f"train.out_dir={s / 'run'}"),
         "train.lr must be a finite number, got inf"),
    Case("nonfinite_lr_nan", lambda w, s: _train("train.lr=nan", f"train.out_dir={s / 'run'}"),
         "train.lr must be a finite number, got nan"),
    Case("nonfinite_norm_eps", lambda w, s: _train("model.norm_eps=inf", f"train.out_dir={s / 'run'}"),
         "norm_eps must be a finite number, got inf"),
    Case("nonfinite_grad_clip", lambda w, s: _train("train.grad_clip=-inf", f"train.out_dir={s / 'run'}"),
         "train.grad_clip must be a finite number, got -inf"),
    # every config value is checked before anything is written (train.seed=-1 once failed at step 1, after
    # the run directory was made, and that directory then blocked the rerun)
    Case("train_seed_negative", lambda w, s: _train("train.seed=-1", f"train.data_dir={w.ds}",
                                                    f"train.out_dir={s / 'run'}"),
         "train.seed must be an integer in [0, 2**63 - 1], got -1"),
    Case("train_seed_too_large", lambda w, s: _train(f"train.seed={2**64}", f"train.data_dir={w.ds}",
                                                     f"train.out_dir={s / 'run'}"),
         f"train.seed must be an integer in [0, 2**63 - 1], got {2**64}"),
    Case("train_negative_steps", lambda w, s: _train("train.max_steps=-5", f"train.out_dir={s / 'run'}"),
         "train.max_steps must be >= 1, got -5"),
    Case("train_batch_size_zero", lambda w, s: _train("train.batch_size=0", f"train.out_dir={s / 'run'}"),
         "train.batch_size must be >= 1, got 0"),
    Case("train_dist_timeout_zero", lambda w, s: _train("train.dist_timeout_s=0", f"train.out_dir={s / 'run'}"),
         "train.dist_timeout_s must be >= 1 (seconds), got 0"),
    Case("train_out_dir_empty", lambda w, s: _train("--config", str(s / "c.yaml")),
         "train.out_dir must name a directory, got an empty string", setup=_write("c.yaml", b'train: {out_dir: ""}\n')),
    Case("train_threads_zero", lambda w, s: _train(f"train.out_dir={s / 'run'}", "--threads", "0"),
         "argument --threads: must be >= 1, got 0"),
    Case("train_stray_argument", lambda w, s: _train(f"train.out_dir={s / 'run'}", "--resume", "max_steps"),
         "unrecognized arguments: max_steps"),
    Case("train_device_cuda_without_cuda", lambda w, s: _train("train.device=cuda", f"train.data_dir={w.ds}",
                                                               f"train.out_dir={s / 'run'}"),
         "device 'cuda' asked for, but CUDA is not available on this machine; use cpu"),
    Case("train_unknown_device", lambda w, s: _train("train.device=tpu", f"train.out_dir={s / 'run'}"),
         "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    # config and experiment files that are not YAML mappings
    Case("config_binary_file", lambda w, s: ["train", "--config", str(s / "c.yaml")], "not a text YAML file (byte ",
         setup=_write("c.yaml", bytes(range(256)))),
    Case("config_not_a_mapping", lambda w, s: ["train", "--config", str(s / "c.yaml")],
         "expected a mapping of config sections, got str", setup=_write("c.yaml", b"just a sentence\n")),
    Case("config_section_not_a_mapping", lambda w, s: ["train", "--config", str(s / "c.yaml")],
         "section 'model' must be a mapping of keys to values", setup=_write("c.yaml", b"model: 5\n")),
    Case("config_is_a_directory", lambda w, s: ["train", "--config", str(w.foreign)], "is not a file"),
    Case("experiment_binary_file", lambda w, s: ["experiment", "pareto", "--config", str(s / "e.yaml")],
         "not a text YAML file (byte ", setup=_write("e.yaml", b"\xff\xfe\x00garbage")),
    Case("experiment_not_a_mapping", lambda w, s: ["experiment", "pareto", "--config", str(s / "e.yaml")],
         "expected a mapping of experiment sections, got list", setup=_write("e.yaml", b"- a\n- b\n")),
    Case("experiment_runs_not_a_list", lambda w, s: ["experiment", "pareto", "--config", str(s / "e.yaml")],
         "runs must be a list, got str",
         setup=_write("e.yaml", b"name: x\nout_dir: o\nbase: {}\nruns: vanilla\n")),
    Case("experiment_base_not_a_mapping", lambda w, s: ["experiment", "pareto", "--config", str(s / "e.yaml")],
         "base must be a dict, got list", setup=_write("e.yaml", b"name: x\nout_dir: o\nbase: [1]\nruns: []\n")),
    Case("experiment_set_not_a_list", lambda w, s: ["experiment", "pareto", "--config", str(s / "e.yaml")],
         "set must be a list of key=value strings",
         setup=_write("e.yaml", b"name: x\nout_dir: o\nbase: {}\nruns: [{name: a, set: model.d_model=64}]\n")),
    # experiments reuse only the run they were asked for, and write only where they may
    Case("experiment_config_changed", lambda w, s: ["experiment", "pareto", "--config", str(s / "exp.yaml")],
         "was trained with another config (model.d_model: 32 -> 64); pass --overwrite to retrain it",
         setup=lambda w, s: _experiment(w, s, d_model=64)),
    Case("experiment_test_split_missing", lambda w, s: ["experiment", "pareto", "--config", str(s / "exp.yaml")],
         "has no 'wikitext_test' split (has: ",
         setup=lambda w, s: _experiment(w, s, {"test_splits": ["wikitext_test"]})),
    Case("experiment_test_split_val", lambda w, s: ["experiment", "pareto", "--config", str(s / "exp.yaml")],
         "test_splits must name other held-out splits than train and val, once each; got 'val'",
         setup=lambda w, s: _experiment(w, s, {"test_splits": ["val"]})),
    Case("experiment_train_unknown_run", lambda w, s: ["experiment", "train", "--config", str(s / "exp.yaml"), "--run",
                                                    "p9"], "experiment 't' has no run 'p9' (runs: base)",
         setup=lambda w, s: _experiment(w, s)),
    Case("experiment_train_other_seed", lambda w, s: ["experiment", "train", "--config", str(s / "exp.yaml"), "--run",
                                                   "base", "--seed", "7"],
         "run 'base' of experiment 't' is trained with seeds [0], not 7", setup=lambda w, s: _experiment(w, s)),
    Case("experiment_out_dir_foreign", lambda w, s: ["experiment", "pareto", "--config", str(s / "e.yaml")],
         "holds notes.txt, which ponderlm did not write; choose another out_dir",
         setup=lambda w, s: (s / "e.yaml").write_text(yaml.safe_dump(
             {"name": "x", "out_dir": str(w.foreign), "base": {}, "runs": [{"name": "a"}]}))),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_error(case, w, tmp_path):
    if case.id == "train_device_cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: train.device=cuda is valid here")
    r = check_case(case, w, tmp_path)
    assert r.returncode == case.exit and r.stderr.strip() == r.stderr.strip().splitlines()[0]  # one line


def test_paths_in_messages_are_the_given_ones(w, tmp_path):
    """The disjointness message names the output and the input as the user wrote them."""
    from errorcases import run_cli

    r = run_cli(_train(f"train.data_dir={w.ds}", f"train.out_dir={w.ds}", "--overwrite"), tmp_path)
    assert r.stderr.strip() == f"error: train.out_dir {w.ds} is the input {w.ds}; write the output somewhere else"
    assert Path(w.ds, "meta.json").is_file()

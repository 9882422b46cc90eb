"""``ponderlm experiment pareto``: train (or reuse) a grid of runs, evaluate each at several tau,
and plot quality against inference FLOPs per token with the Pareto frontier marked.

The experiment file is described in :mod:`ponderlm.experiments.config`, the report in
:mod:`ponderlm.experiments.report`. Finished runs (a checkpoint at train.max_steps) are reused, so
an interrupted experiment continues where it stopped, and so are their evaluations
(``<run>/experiment_eval.json``, keyed by the checkpoint and every evaluation setting).

With ``--jobs N`` (N > 1) the runs that need training are trained, and every run without a
current evaluation is evaluated, in up to N worker processes at once, each with 1/N of the
command's threads (``--threads``, else the free cores: :mod:`ponderlm.threads`; ``cpu_count`` for
a library caller that gives none): tiny models train faster as several single-thread processes
than as one multi-thread one; a run's explicit ``train.threads`` still applies. A worker evaluates
its run as soon as it has trained it. A run whose ``train.init_from`` is another run of the
experiment starts once that run has finished. Each worker rebuilds its run config from a snapshot of the experiment
(``<out_dir>/.logs/experiment.yaml``) and writes its output to ``<out_dir>/.logs/<run>.log`` (not
into the run directory, which the trainer creates and owns). After a failed worker nothing new
starts; the running ones finish, and the error names the failed run and its log. The report is then
made in this process from the workers' saved evaluations, as with one job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import site
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import threads as threads_mod
from ..checkpoint import latest_checkpoint
from ..config import ConfigError, RunConfig, load_run_config
from ..data import TokenShards, eval_windows, load_meta, window_labels
from ..data.tokenizer import Tokenizer
from ..eval.ablations import Ablation
from ..eval.perplexity import perplexity
from ..eval.tasks import load_tasks
from ..eval.zeroshot import score_task
from ..loading import load_model
from ..model import CONVERGED, PonderLM
from ..owned import DirLock, OwnershipError, atomic_write, is_empty_dir, is_kind, make_owned_dir, read_marker
from ..progress import heartbeat
from ..train import TrainingStopped, resolve_model_config, train
from .config import ExperimentConfig
from .report import collect_points, markdown, pareto_front, plot

__all__ = ["ExperimentConfig", "collect_points", "evaluate_run", "pareto_front", "run_experiment", "train_run"]


# ------------------------------------------------------------------ runs
def finished(run_dir: Path, steps: int) -> bool:
    ck = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return ck is not None and json.loads((ck / "trainer_state.json").read_text())["step"] >= steps


# how every run is scored: hard pruning, Jacobi passes until the latents settle (generate's prefill rule)
SCORING = {"mode": "hard", **CONVERGED}
EVAL_FILE = "experiment_eval.json"  # in each run directory: its evaluation and what it was computed with

# train.* fields that do not change what a run learns: a finished run is reused whatever they say
BOOKKEEPING = {"out_dir", "progress", "log_interval", "eval_interval", "eval_windows", "eval_tau", "ckpt_interval",
               "keep_last", "tensorboard", "wandb", "wandb_project", "device", "threads", "dist_timeout_s", "compile",
               "dist", "verify_data"}  # fmt: skip


def config_differences(run_dir: Path, requested: RunConfig) -> list[str]:
    """How the run in ``run_dir`` (its saved, resolved config.yaml) differs from the ``requested``
    one once the dataset has resolved it as the trainer would; [] when it is the same run."""
    want = RunConfig(model=requested.model.replace(), train=requested.train)
    meta = load_meta(Path(requested.train.data_dir))
    resolve_model_config(want, set(), int(meta["tokenizer"]["vocab_size"]))
    have, _ = load_run_config(run_dir / "config.yaml")
    diffs = []
    for section in ("model", "train"):
        a, b = getattr(have, section).__dict__, getattr(want, section).__dict__
        for k in a:
            if a[k] != b[k] and not (section == "train" and k in BOOKKEEPING):
                diffs.append(f"{section}.{k}: {a[k]!r} -> {b[k]!r}")
    return diffs


def _report_files(stem: str) -> set[str]:
    """The files an experiment's report writes into its out_dir."""
    return {f"{stem}.{ext}" for ext in ("md", "json", "png")}


def check_experiment_dir(out: Path, names: set[str]) -> None:
    """An experiment writes run directories and its report files into out_dir; refuse a directory
    that holds anything else unless ponderlm made it for an experiment."""
    if not out.exists() or is_empty_dir(out):
        return
    if not out.is_dir():
        raise OwnershipError(f"experiment out_dir {out} is a file; choose a directory")
    marker = read_marker(out)
    if marker is not None:
        if marker["kind"] != "experiment":
            raise OwnershipError(f"experiment out_dir {out} is a ponderlm {marker['kind']}; choose another out_dir")
        return
    for p in out.iterdir():  # made before markers existed: runs and reports only
        if p.name.startswith(".") or p.name in names or (p.is_dir() and is_kind(p, "run")):
            continue
        raise OwnershipError(
            f"experiment out_dir {out} holds {p.name}, which ponderlm did not write; choose another out_dir"
        )


def check_reusable(rc: RunConfig, overwrite: bool) -> None:
    """Refuse to report a run trained with another config than the one the experiment asks for
    (checked for every run before anything is written); --overwrite retrains it instead."""
    run_dir = Path(rc.train.out_dir)
    if overwrite or not (run_dir / "config.yaml").is_file():
        return
    diffs = config_differences(run_dir, rc)
    if diffs:
        raise ConfigError(
            f"{run_dir} was trained with another config ({'; '.join(diffs[:3])}); pass --overwrite to retrain "
            "it, or give the run another name"
        )


def _prepare_run(rc: RunConfig, overwrite: bool, eval_only: bool, log, tag: str) -> bool:
    """Make the run of ``rc`` ready to report: reuse it when finished with the same config,
    resume it when unfinished, (re)train it when absent or --overwrite. A run trained with another
    config is refused. Returns False when --eval-only leaves it out."""
    run_dir = Path(rc.train.out_dir)
    reuse, resume, replace = _decide(rc, overwrite)
    if reuse:
        log(f"\n== {tag} {run_dir.name}: finished run found, reusing it")
        return True
    if eval_only:
        log(f"\n== {tag} {run_dir.name}: not finished, left out (--eval-only)")
        return False
    log(f"\n== {tag} {'resuming' if resume else 'training'} {run_dir.name} ({rc.model.method})")
    train(rc, set(), resume=resume, overwrite=replace, log=log)
    return True


def _decide(rc: RunConfig, overwrite: bool) -> tuple[bool, bool, bool]:
    """What to do with the run of ``rc``: (reuse it, as it is finished; resume it, as it was
    started, with or without a checkpoint yet; replace it, under --overwrite). Neither reuse nor
    resume: train it from scratch."""
    run_dir = Path(rc.train.out_dir)
    exists = run_dir.is_dir() and not is_empty_dir(run_dir)
    if exists and not overwrite and finished(run_dir, rc.train.max_steps):
        return True, False, False
    return False, exists and not overwrite, overwrite and exists


def train_run(cfg: ExperimentConfig, name: str, seed: int | None = None, *, overwrite: bool = False,
              log=print) -> Path:  # fmt: skip
    """Train (or resume, or find finished) one run of the experiment exactly as ``experiment
    pareto`` would, into its place in out_dir: ``ponderlm experiment train``, the command to launch
    under torchrun for runs too large for one process. ``seed`` defaults to the run's first."""
    runs = {r["name"]: r for r in cfg.runs}
    if name not in runs:
        raise ConfigError(f"experiment {cfg.name!r} has no run {name!r} (runs: {', '.join(runs)})")
    seeds = cfg.run_seeds(runs[name])
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise ConfigError(f"run {name!r} of experiment {cfg.name!r} is trained with seeds {seeds}, not {seed}")
    rc = cfg.run_config(runs[name], seed)
    run_dir = Path(rc.train.out_dir)
    check_reusable(rc, overwrite)
    reuse, resume, replace = _decide(rc, overwrite)
    if reuse:
        log(f"{run_dir} is finished (step {rc.train.max_steps}); nothing to train")
        return run_dir
    if int(os.environ.get("RANK", "0")) == 0:  # one process of a torchrun job makes the experiment directory
        out = Path(cfg.out_dir)
        check_experiment_dir(out, _report_files("pareto"))
        make_owned_dir(out, "experiment")
    train(rc, set(), resume=resume, overwrite=replace, log=log)
    return run_dir


# ------------------------------------------------------------------ training in worker processes (--jobs N)
LOGS = ".logs"  # in the experiment's out_dir: the snapshot the workers read, and one log per run they train
POLL_S = 0.2  # how often the parent looks at its workers
STOP_GRACE_S = 10.0  # how long stopped workers get to end before they are killed


@dataclass(eq=False)
class _Job:
    """One (run, seed) to train and evaluate, or only evaluate, in a worker process."""

    tag: str  # "[n/N]", its place in cfg.jobs()
    run: str
    seed: int
    rc: RunConfig
    resume: bool
    replace: bool
    log_file: Path
    train: bool = True  # False: the run is finished and only its evaluation is missing
    after: _Job | None = None  # the job whose run this one starts from (train.init_from)
    proc: subprocess.Popen | None = None
    started: float = 0.0

    @property
    def name(self) -> str:
        return Path(self.rc.train.out_dir).name

    @property
    def verb(self) -> str:
        return "evaluating" if not self.train else "resuming" if self.resume else "training"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (a container's share)
    except AttributeError:
        return os.cpu_count() or 1


def _plan_work(cfg: ExperimentConfig, overwrite: bool, eval_only: bool, logs: Path) -> list[_Job]:
    """The jobs for the workers, in cfg.jobs() order: the runs that need training (the decisions of
    :func:`_prepare_run`; none under --eval-only), each with the job it must wait for (the one whose
    run directory is its train.init_from), and the finished runs whose evaluation is not saved."""
    every = cfg.jobs()
    todo, by_dir = [], {}
    for n, (seed, run) in enumerate(every, 1):
        rc = cfg.run_config(run, seed)
        run_dir = Path(rc.train.out_dir)
        reuse, resume, replace = _decide(rc, overwrite)
        if (reuse and cached_result(run_dir, cfg) is not None) or (eval_only and not reuse):
            continue
        job = _Job(f"[{n}/{len(every)}]", run["name"], seed, rc, resume, replace, logs / f"{run_dir.name}.log",
                   train=not reuse)  # fmt: skip
        todo.append(job)
        if job.train:
            by_dir[run_dir.resolve()] = job
    for job in todo:
        if job.train and job.rc.train.init_from:
            job.after = by_dir.get(Path(job.rc.train.init_from).resolve())
    return todo


def _snapshot(cfg: ExperimentConfig, path: Path, todo: list[_Job]) -> None:
    """Write the experiment the workers rebuild their run configs from (not the user's file, which
    may be edited while the experiment runs), and check it gives every job exactly its config."""
    import yaml

    atomic_write(path, yaml.safe_dump(asdict(cfg), sort_keys=False))
    again = ExperimentConfig.load(path)
    runs = {r["name"]: r for r in again.runs}
    for job in todo:
        if again.run_config(runs[job.run], job.seed) != job.rc:
            raise RuntimeError(f"{path}: the experiment's config of {job.name} does not survive a YAML round trip")


def _start(job: _Job, spec: Path, threads: int, cache_dir: Path, log) -> None:
    """Start the worker process of ``job``; its output goes to the end of its log file."""
    import ponderlm

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    root = str(Path(ponderlm.__file__).resolve().parents[1])
    if root not in {str(Path(p).resolve()) for p in site.getsitepackages()}:  # a source tree: import this very one
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    argv = [spec, job.run, job.seed, int(job.train), int(job.resume), int(job.replace), threads, os.getpid(),
            cache_dir]  # fmt: skip
    code = "from ponderlm.experiments.pareto import _worker; _worker()"
    verb = job.verb
    with open(job.log_file, "a") as fh:  # the child has its own copy of the descriptor
        fh.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {verb} {job.name} ({job.rc.model.method}), "
                 f"{threads} thread(s)\n")  # fmt: skip
        fh.flush()
        job.proc = subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    job.started = time.time()
    log(f"\n== {job.tag} {verb} {job.name} ({job.rc.model.method}) in worker {job.proc.pid}, log {job.log_file}")


def _last_line(path: Path) -> str:
    """What a failed worker said last (its error line, or the last line of its traceback)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    last = lines[-1] if lines else ""
    last = last.removeprefix("error: ")
    return last if len(last) <= 300 else last[:297] + "..."


def _stop(running: list[_Job], log) -> None:
    """End the running workers (Ctrl-C, or any error in the parent): SIGTERM, then SIGKILL."""
    for job in running:
        if job.proc.poll() is None:
            job.proc.terminate()
    deadline = time.time() + STOP_GRACE_S
    for job in running:
        try:
            job.proc.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()
    if running:
        log(f"stopped {len(running)} worker(s): {', '.join(j.name for j in running)}")


def _work_in_workers(cfg: ExperimentConfig, *, overwrite: bool, eval_only: bool, workers: int, cache_dir: Path,
                     log, threads: int | None = None) -> None:  # fmt: skip
    """Train and evaluate every run of the experiment that needs it (only evaluate, under
    --eval-only) in up to ``workers`` processes at once, each with its share of the cores. Jobs
    start in cfg.jobs() order, a job only once the run it is initialised from has finished. After a
    failure the running jobs finish, nothing new starts, and a one-line error names the failed run
    and its log."""
    out = Path(cfg.out_dir)
    logs = out / LOGS
    todo = _plan_work(cfg, overwrite, eval_only, logs)
    if not todo:
        return
    logs.mkdir(exist_ok=True)
    spec = logs / "experiment.yaml"
    _snapshot(cfg, spec, todo)
    threads = max(1, (threads or _cpu_count()) // workers)
    n_train = sum(j.train for j in todo)
    log(f"\n== training {n_train} and evaluating {len(todo)} run(s) in up to {workers} worker processes of "
        f"{threads} thread(s); logs in {logs}")  # fmt: skip
    pending, running, done, failed = list(todo), [], set(), []
    try:
        while pending or running:
            for job in [] if failed else list(pending):
                if len(running) < workers and (job.after is None or job.after in done):
                    pending.remove(job)
                    _start(job, spec, threads, cache_dir, log)
                    running.append(job)
            if not running:
                if failed:
                    break
                waiting = ", ".join(f"{j.name} (after {j.after.name})" for j in pending)
                raise ConfigError(f"runs wait for each other through train.init_from: {waiting}")
            time.sleep(POLL_S)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                took = time.time() - job.started
                if job.proc.returncode == 0:
                    done.add(job)
                    log(f"== {job.tag} {job.name} {'trained and ' if job.train else ''}evaluated ({took:.1f} s)")
                else:
                    failed.append(job)
                    log(f"== {job.tag} {job.name} FAILED ({took:.1f} s, exit {job.proc.returncode}): "
                        f"{_last_line(job.log_file)}; log {job.log_file}")  # fmt: skip
    except BaseException:
        _stop(running, log)
        raise
    if failed:
        raise _failure(failed, pending)


def _failure(failed: list[_Job], pending: list[_Job]) -> Exception:
    """The one-line error of failed workers: a user error (exit 2) when every worker failed with
    one, TrainingStopped (exit 3) otherwise."""
    first = failed[0]
    code = first.proc.returncode
    why = _last_line(first.log_file) if code > 0 else f"killed by signal {-code}"
    msg = f"{'training' if first.train else 'evaluating'} {first.name} failed ({why}); its log: {first.log_file}"
    if len(failed) > 1:
        msg += "; also failed: " + ", ".join(f"{j.name} (log: {j.log_file})" for j in failed[1:])
    if pending:
        msg += "; not started: " + ", ".join(j.name for j in pending)
    msg += ". The runs that finished are kept: run the command again to continue"
    return ConfigError(msg) if all(j.proc.returncode == 2 for j in failed) else TrainingStopped(msg)


def _worker() -> None:
    """A worker process (``python -c``): train (unless told not to) and evaluate one run of an
    experiment. argv: the experiment snapshot, run name, seed, train, resume and replace (0/1),
    torch threads, the parent's pid, the package cache of the zero-shot tasks. A user error ends it
    with ``error: ...`` and status 2, a stopped training with 3 (as the CLI does)."""
    from ..errors import UserError

    spec, name, seed, do_train, resume, replace, threads, parent, cache_dir = sys.argv[1:]
    _die_with(int(parent))
    threads_mod.use(threads_mod.Choice(int(threads), "this worker's share, from experiment pareto --jobs"))
    try:
        cfg = ExperimentConfig.load(spec)
        rc = cfg.run_config(next(r for r in cfg.runs if r["name"] == name), int(seed))
        if do_train == "1":
            train(rc, set(), resume=resume == "1", overwrite=replace == "1", log=print)
        tasks = load_tasks(cfg.tasks, Path(cache_dir), limit=cfg.task_limit, log=print) if cfg.tasks else None
        print(f"evaluating {rc.train.out_dir}")
        _evaluate(Path(rc.train.out_dir), rc, cfg, tasks)
    except UserError as e:
        print(f"error: {e}")
        sys.exit(2)
    except TrainingStopped as e:
        print(f"error: {e}")
        sys.exit(3)


def _die_with(parent: int) -> None:
    """Have the kernel end this worker when its parent dies, even killed (Linux); elsewhere the
    parent's Ctrl-C handling stops its workers."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before that took effect
        sys.exit(1)


# ------------------------------------------------------------------ evaluation
def _tau_rows(model: PonderLM, tok: Tokenizer, val: torch.Tensor, taus: list[float], tasks: dict | None,
              labelled: dict, tests: dict[str, torch.Tensor]) -> list[dict]:  # fmt: skip
    """Validation loss (hard mode) at each tau, with the loss on each test split (``tests``: its
    windows), the zero-shot accuracies when tasks are given, and the per-class metrics on a
    labelled dataset (``labelled`` holds labels and classes)."""
    rows = []
    for tau in taus:
        r = perplexity(model, val, tau=tau, batch_size=16, **labelled, **SCORING)
        row = {"tau": tau, **r}
        if tests:
            row["splits"] = {}
            for split, windows in tests.items():
                t = perplexity(model, windows, tau=tau, batch_size=16, **SCORING)
                row["splits"][split] = {"loss": t["loss"], "mean_depth": t["mean_depth"],
                                        "tokens": windows.shape[0] * (windows.shape[1] - 1)}  # fmt: skip
        if tasks:
            accs = {name: score_task(model, tok, docs, tau=tau, jacobi=CONVERGED)["acc"]
                    for name, docs in tasks.items()}  # fmt: skip
            row["zeroshot"] = accs
            row["zeroshot_avg"] = sum(accs.values()) / len(accs)
        rows.append(row)
    return rows


def _ablation_rows(model: PonderLM, val: torch.Tensor, taus: list[float], ablations: list[str],
                   labelled: dict) -> list[dict]:  # fmt: skip
    """Validation loss of a PonderLM-3 model under each ablation: every fixed depth 0..K, and the
    random/entropy re-assignments of the router's depths at every tau."""
    rows = []
    for policy in ablations:
        if policy == "fixed":
            for d in range(model.cfg.max_depth + 1):
                r = perplexity(model, val, batch_size=16, ablation=Ablation("fixed", depth=d), **labelled, **SCORING)
                rows.append({"policy": "fixed", "depth": d, "tau": None, **r})
        else:
            for tau in taus:
                r = perplexity(model, val, tau=tau, batch_size=16, ablation=Ablation(policy), **labelled, **SCORING)
                rows.append({"policy": policy, "depth": None, "tau": tau, **r})
    return rows


def evaluate_run(
    run_dir: Path,
    data_dir: Path,
    taus: list[float],
    windows: int,
    tasks: dict | None = None,
    ablations: list[str] = (),
    test_splits: list[str] = (),
    ablation_taus: list[float] | None = None,
) -> dict[str, Any]:
    """Validation loss (hard mode) at each tau (one tau for methods without a router), with mean
    depth and inference FLOPs/token, and the loss on each of ``test_splits`` (the same number of
    fixed windows); zero-shot average accuracy when tasks are given; for PonderLM-3 the requested
    ablations (fixed depths 0..K; random/entropy at each of ``ablation_taus``, by default every
    tau), on the validation split. On a
    dataset with token labels (``ponderlm data synthetic``) every row also has the per-class
    ``classes`` and ``difficulty`` of :func:`ponderlm.eval.perplexity.summarize_classes`."""
    model, tok, ck = load_model(run_dir)
    cfg = model.cfg
    meta = load_meta(data_dir)
    val = eval_windows(TokenShards(data_dir, "val"), cfg.max_seq_len, windows)
    tests = {s: eval_windows(TokenShards(data_dir, s), cfg.max_seq_len, windows) for s in test_splits}
    found = window_labels(data_dir, meta, "val", cfg.max_seq_len, windows)
    labelled = {} if found is None else {"classes": found[0], "labels": found[1]}
    rows = _tau_rows(model, tok, val, taus if cfg.has_router else taus[:1], tasks, labelled, tests)
    abl_taus = list(taus if ablation_taus is None else ablation_taus)
    abl = _ablation_rows(model, val, abl_taus, list(ablations), labelled) if cfg.has_router else []
    soft = perplexity(model, val, mode="soft", batch_size=16)
    state = json.loads((ck / "trainer_state.json").read_text())
    train_tokens = int(meta["splits"]["train"]["tokens"])
    return {
        "method": cfg.method,
        "K": cfg.max_depth,
        "router": cfg.has_router,
        "penalty_weight": cfg.penalty_weight if cfg.has_router else None,
        "params": model.num_parameters(),
        "steps": state["step"],
        "tokens": state.get("tokens_seen", 0),
        "epoch_fraction": state.get("tokens_seen", 0) / train_tokens,
        "soft_loss": soft["loss"],
        # what the validation numbers are over: windows of the context, the positions they score, and
        # the size of the split they are the first windows of
        "val_windows": int(val.shape[0]),
        "val_tokens": int(val.shape[0] * (val.shape[1] - 1)),
        "val_split_tokens": int(meta["splits"]["val"]["tokens"]),
        "evals": rows,
        "ablations": abl,
    }


def _eval_key(run_dir: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything a cached evaluation of ``run_dir`` depends on: its checkpoint and the settings."""
    ck = latest_checkpoint(run_dir)
    return {
        "checkpoint": ck.name if ck else None,
        "manifest_sha": hashlib.sha256((ck / "manifest.json").read_bytes()).hexdigest() if ck else None,
        "taus": list(cfg.taus),
        "eval_windows": cfg.eval_windows,
        "tasks": list(cfg.tasks),
        "task_limit": cfg.task_limit,
        "ablations": list(cfg.ablations),
        "ablation_taus": cfg.ablation_taus,
        "test_splits": list(cfg.test_splits),
        "scoring": SCORING,  # results scored otherwise (before: J=3) are recomputed
    }


def cached_result(run_dir: Path, cfg: ExperimentConfig, key: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The run's saved evaluation under this experiment's settings (``key``: :func:`_eval_key`,
    computed when not given), or None."""
    path = run_dir / EVAL_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        return saved["result"] if saved.get("key") == (key or _eval_key(run_dir, cfg)) else None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def cached_evaluation(run_dir: Path, cfg: ExperimentConfig, compute) -> dict[str, Any]:
    """The run's evaluation under this experiment's settings, computed once per checkpoint."""
    key = _eval_key(run_dir, cfg)
    found = cached_result(run_dir, cfg, key)
    if found is not None:
        return found
    result = compute()
    atomic_write(run_dir / EVAL_FILE, json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def _evaluate(run_dir: Path, rc: RunConfig, cfg: ExperimentConfig, tasks: dict | None, log=print) -> dict[str, Any]:
    """:func:`evaluate_run` of one run of the experiment, through its cache; an evaluation that
    runs says so, and every 10 s that it still does."""
    settings = (list(cfg.taus), cfg.eval_windows, tasks, cfg.ablations, cfg.test_splits, cfg.ablation_taus)

    def compute() -> dict[str, Any]:
        log(f"evaluating {run_dir.name}: validation loss on {cfg.eval_windows} windows"
            + (f", {len(tasks)} zero-shot task(s)" if tasks else ""))  # fmt: skip
        t0 = time.time()
        with heartbeat(f"evaluating {run_dir.name}", log):
            result = evaluate_run(run_dir, Path(rc.train.data_dir), *settings)
        log(f"evaluated {run_dir.name} in {time.time() - t0:.0f} s")
        return result

    return cached_evaluation(run_dir, cfg, compute)


def check_test_splits(cfg: ExperimentConfig) -> None:
    """Every run's dataset has the experiment's test splits (checked before anything trains)."""
    if not cfg.test_splits:
        return
    for data_dir in sorted({cfg.run_config(r, cfg.run_seeds(r)[0]).train.data_dir for r in cfg.runs}):
        splits = load_meta(Path(data_dir))["splits"]
        lacking = [s for s in cfg.test_splits if s not in splits]
        if lacking:
            raise ConfigError(f"test_splits: {data_dir} has no {', '.join(map(repr, lacking))} split (has: "
                              f"{', '.join(splits)}); remove it from test_splits, or prepare a dataset with "
                              "it")  # fmt: skip


# ------------------------------------------------------------------ the experiment
def run_experiment(
    cfg: ExperimentConfig,
    cache_dir: Path,
    *,
    overwrite: bool = False,
    eval_only: bool = False,
    log=print,
    stem: str = "pareto",
    jobs: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train, resume or reuse every run of the experiment, evaluate, and write the report; the
    experiment's out_dir is locked for the whole command. With ``jobs`` > 1 the runs are first
    trained and evaluated in up to ``jobs`` worker processes at once (:func:`_work_in_workers`),
    sharing ``threads`` threads (default: the cores this process may use).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    out = Path(cfg.out_dir)
    with DirLock(out, "out_dir"):
        check_experiment_dir(out, _report_files(stem))
        return _run_experiment(cfg, cache_dir, out, overwrite=overwrite, eval_only=eval_only, log=log, stem=stem,
                               jobs=jobs, threads=threads)  # fmt: skip


def _run_experiment(cfg, cache_dir, out: Path, *, overwrite: bool, eval_only: bool, log, stem: str,
                    jobs: int = 1, threads: int | None = None) -> dict[str, Any]:  # fmt: skip
    t0 = time.time()
    for r in cfg.runs:
        for seed in cfg.run_seeds(r):
            check_reusable(cfg.run_config(r, seed), overwrite)
    check_test_splits(cfg)
    make_owned_dir(out, "experiment")
    if jobs == 1:
        log(threads_mod.describe())
    if jobs > 1:
        _work_in_workers(cfg, overwrite=overwrite, eval_only=eval_only, workers=jobs, cache_dir=cache_dir, log=log,
                         threads=threads)  # fmt: skip
        overwrite = False  # every run is trained and evaluated now: the loop below reuses them
    tasks = load_tasks(cfg.tasks, cache_dir, limit=cfg.task_limit, log=log) if cfg.tasks else None
    results, missing = _train_and_evaluate(cfg, tasks, overwrite=overwrite, eval_only=eval_only, log=log)
    if not results:
        raise ConfigError("no finished run to report (--eval-only trains nothing)")
    return _write_report(cfg, out, results, missing, (time.time() - t0) / 60, log, stem)


def _train_and_evaluate(cfg: ExperimentConfig, tasks: dict | None, *, overwrite: bool, eval_only: bool,
                        log) -> tuple[list[dict], list[str]]:  # fmt: skip
    """Every job of the experiment made ready and evaluated: (results, names of runs left out)."""
    results, missing = [], []
    jobs = cfg.jobs()
    for n, (seed, run) in enumerate(jobs, 1):
        rc = cfg.run_config(run, seed)
        run_dir = Path(rc.train.out_dir)
        if not _prepare_run(rc, overwrite, eval_only, log, tag=f"[{n}/{len(jobs)}]"):
            missing.append(run_dir.name)
            continue
        r = _evaluate(run_dir, rc, cfg, tasks, log)
        results.append({"run": run["name"], "seed": seed, **r})
    return results, missing


def _write_report(cfg: ExperimentConfig, out: Path, results: list[dict], missing: list[str], minutes: float, log,
                  stem: str) -> dict[str, Any]:  # fmt: skip
    """``stem``.md, .json and .png in ``out``; returns the JSON payload."""
    points = collect_points(results)
    md = markdown(f"Pareto experiment `{cfg.name}`", points, minutes, cfg.references)
    if missing:
        md += f"\nNot finished, left out: {', '.join(missing)}.\n"
    payload = {"name": cfg.name, "taus": cfg.taus, "seeds": cfg.seeds, "results": results, "points": points}
    for name, text in ((f"{stem}.md", md), (f"{stem}.json", json.dumps(payload, indent=2) + "\n")):
        atomic_write(out / name, text)
    plot(points, out / f"{stem}.png", f"quality vs inference compute: {cfg.name}")
    log("\n" + md)
    log(f"wrote {out / (stem + '.md')}, {out / (stem + '.json')}, {out / (stem + '.png')} ({minutes:.1f} min)")
    return payload

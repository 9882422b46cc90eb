"""``experiment pareto --jobs N`` (N > 1): the runs that need training are trained, and every run
without a current evaluation is evaluated, in up to N worker processes at once, each with 1/N of the
command's threads (``--threads``, else the free cores: :mod:`ponderlm.threads`; ``cpu_count`` for
a library caller that gives none): tiny models train faster as several single-thread processes
than as one multi-thread one; a run's explicit ``train.threads`` still applies. A worker evaluates
its run as soon as it has trained it. A run whose ``train.init_from`` is another run of the
experiment starts once that run has finished. Each worker rebuilds its run config from a snapshot of the experiment
(``<out_dir>/.logs/experiment.yaml``) and writes its output to ``<out_dir>/.logs/<run>.log`` (not
into the run directory, which the trainer creates and owns). After a failed worker nothing new
starts; the running ones finish, and the error names the failed run and its log. The report is then
made by :mod:`ponderlm.experiments.runner` from the workers' saved evaluations, as with one job.
"""

from __future__ import annotations

import contextlib
import os
import site
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ponderlm import threads as threads_mod
from ponderlm.errors import ConfigError, TrainingStopped
from ponderlm.eval.tasks import load_tasks
from ponderlm.experiments.config import ExperimentConfig
from ponderlm.experiments.evaluation import cached_result, evaluate_experiment_run
from ponderlm.experiments.reuse import decide
from ponderlm.owned import atomic_write
from ponderlm.runs.config import RunConfig
from ponderlm.training.trainer import train

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
    :func:`prepare_run`; none under --eval-only), each with the job it must wait for (the one whose
    run directory is its train.init_from), and the finished runs whose evaluation is not saved."""
    every = cfg.jobs()
    todo, by_dir = [], {}
    for n, (seed, run) in enumerate(every, 1):
        rc = cfg.run_config(run, seed)
        run_dir = Path(rc.train.out_dir)
        reuse, resume, replace = decide(rc, overwrite)
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
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the package ponderlm/
    if root not in {str(Path(p).resolve()) for p in site.getsitepackages()}:  # a source tree: import this very one
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    argv = [spec, job.run, job.seed, int(job.train), int(job.resume), int(job.replace), threads, os.getpid(),
            cache_dir]  # fmt: skip
    code = "from ponderlm.experiments.workers import _worker; _worker()"
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


def work_in_workers(cfg: ExperimentConfig, *, overwrite: bool, eval_only: bool, workers: int, cache_dir: Path,
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
    from ponderlm.errors import UserError

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
        evaluate_experiment_run(Path(rc.train.out_dir), rc, cfg, tasks)
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

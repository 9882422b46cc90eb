"""The trainer: AdamW with warmup + cosine, gradient accumulation, clipping, bf16 autocast on GPU,
optional torch.compile, DDP or FSDP2 under torchrun, periodic validation in both the training
(soft) and inference (hard-pruned) computations, atomic checkpoints and exact resume.

Determinism: the data of step s and its Jacobi count are pure functions of (seed, s), and the
learning rate is a function of s, so resuming from a checkpoint continues exactly as an
uninterrupted run would (on CPU, step for step), with any number of processes.

The pieces around the loop live beside it: the schedules in :mod:`ponderlm.training.schedule`,
the run directory, pre-flight checks, resume and metrics.jsonl in :mod:`ponderlm.training.rundir`,
the process group and DDP/FSDP2 wrapping in :mod:`ponderlm.training.distributed`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ponderlm import threads
from ponderlm.data import TokenShards, TrainBatches, check_dataset, eval_windows
from ponderlm.errors import CheckpointError, CheckpointWriteError, TrainingStopped
from ponderlm.eval.perplexity import HIST, score_batch, summarize
from ponderlm.model import flops as flops_mod
from ponderlm.model.losses import ponder_loss
from ponderlm.model.model import PonderLM
from ponderlm.model.size import check_training_fits
from ponderlm.owned import DirLock, check_disjoint
from ponderlm.progress import Rate, clock, redraws
from ponderlm.runs.checkpoint import fault_point, load_model_weights, save_checkpoint
from ponderlm.runs.config import RunConfig, save_run_config
from ponderlm.training.distributed import DistEnv, full_state, grad_sync, load_optimizer_state, wrap_model
from ponderlm.training.rundir import (
    MetricsLog,
    batch_split,
    carried_tokenizer_config,
    check_ids,
    check_run_dir,
    init_source,
    last_good,
    prepare_run_dir,
    resolve_model_config,
    resume_point,
)
from ponderlm.training.schedule import jacobi_iters_at, lr_at


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class _Pace:
    """Throughput bookkeeping of one :meth:`Trainer.run`: when and at which step it started, the
    time and token count of the last logged step (the metrics' tokens_per_s is measured since
    then), and the rate that progress shows, over the last 30 s, from which its ETA derives."""

    t_start: float
    first_step: int
    t_last: float
    tok_last: int
    rate: Rate = field(default_factory=Rate)

    def shown(self, tokens_left: int) -> tuple[str, str]:
        """(tokens/s, ETA) as a progress line shows them: both from :attr:`rate`."""
        per_s = self.rate.per_s
        return ("?" if per_s is None else f"{per_s:,.0f}"), clock(self.rate.eta_s(tokens_left))


def compile_blocks(model: PonderLM) -> None:
    """``train.compile``: torch.compile each block, not the whole forward: the pass loop runs over
    sequences of several lengths (warm-up stages, pruning), which dynamic shapes absorb per block."""
    from torch import _dynamo

    cfg_d = _dynamo.config
    name = "recompile_limit" if hasattr(cfg_d, "recompile_limit") else "cache_size_limit"
    setattr(cfg_d, name, max(64, getattr(cfg_d, name)))  # bias/no-bias, train/eval, pruned
    for block in model.layers:
        block.compile(dynamic=True)


class Trainer:
    """One training run in ``train.out_dir``. Construction checks everything that can be checked
    before any file is written (the config, the dataset, the run directory and, with ``resume``,
    the checkpoint and its tokenizer) while holding the directory's lock; a refusal leaves the disk
    as it was. The lock is held until :meth:`close`."""

    def __init__(
        self,
        cfg: RunConfig,
        explicit: set[str] | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        log=print,
    ) -> None:
        self.cfg, self.log = cfg, log
        tc = cfg.train
        self.env = DistEnv(tc.device, tc.dist_timeout_s)
        self.sharded = self.env.world > 1 and tc.dist == "fsdp"  # FSDP2: parameters and optimizer state sharded
        if tc.threads and threads.describe() != threads.Choice(tc.threads, "--threads").line():
            threads.use(threads.Choice(tc.threads, "train.threads"))  # the command line's --threads stays
        self.out = Path(tc.out_dir)
        self.lock = DirLock(self.out, "train.out_dir") if self.env.is_main else None
        self.finished = False  # resumed at train.max_steps: nothing to do
        if self.lock is not None:
            self.lock.acquire()
        try:
            self._setup(cfg, set(explicit or ()), resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: RunConfig, explicit: set[str], resume: bool, overwrite: bool) -> None:
        """The pre-flight checks (:mod:`ponderlm.training.rundir`) in order, then the first writes."""
        tc = cfg.train
        inputs = [Path(tc.data_dir)] + ([Path(tc.init_from)] if tc.init_from else [])
        check_disjoint(self.out, inputs, "train.out_dir")
        replace_run = check_run_dir(self.out, resume, overwrite)  # nothing is created or deleted before this

        # data and tokenizer decide the vocabulary unless the user set it
        meta = check_dataset(Path(tc.data_dir), verify_hashes=tc.verify_data, remember=False)
        self.tokenizer_file = Path(tc.data_dir) / meta["tokenizer"]["file"]
        self.tok_vocab = int(meta["tokenizer"]["vocab_size"])
        init_state = init_dir = None
        if tc.init_from:  # continued pretraining: the backbone (sizes and weights) comes from there
            init_state, explicit, init_dir = init_source(tc.init_from, cfg, explicit, self.tokenizer_file)
        resolve_model_config(cfg, explicit, self.tok_vocab)
        self.per_rank, self.micro, self.accum = batch_split(tc, self.env.world)
        # sizes that cannot fit are refused here, naming the keys, not as an allocator's traceback later
        bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and self.env.device.type == "cuda")
        check_training_fits(cfg.model, self.micro, tc.seq_len, self.env.world, self.env.device, 2 if bf16 else 4)
        self.autocast_dtype = torch.bfloat16 if bf16 else None

        self.train_data = TrainBatches(TokenShards(tc.data_dir, "train"), tc.seq_len, tc.seed)
        self.val = eval_windows(TokenShards(tc.data_dir, "val"), tc.seq_len, tc.eval_windows)
        check_ids(self.val, self.tok_vocab, tc.data_dir)

        self._build_model(init_state)
        self.step = self.tokens_seen = 0
        self.bad_in_row = self.bad_total = 0  # non-finite steps skipped: current streak, whole run
        start, ck = resume_point(self.out, cfg, self.tokenizer_file, self.log) if resume else (None, None)
        self.tokenizer_config = carried_tokenizer_config(start, init_dir)
        if ck is not None:
            self._restore(ck)
            if self.finished:
                return
        self._build_optimizer(ck)
        prepare_run_dir(self.out, self.env, replace_run, resume, tc.data_dir, self.log)
        self.metrics = MetricsLog(self.out, self.env.is_main)
        if ck is not None:
            self.log(f"resumed from {start} at step {self.step}")
            self.metrics.truncate(self.step, self.log)
        if self.env.is_main:
            save_run_config(cfg, self.out / "config.yaml")
            self.metrics.open_trackers(cfg)

    def _build_model(self, init_state: dict[str, torch.Tensor] | None) -> None:
        """The model, seeded by train.seed; with train.init_from, holding the source's backbone."""
        torch.manual_seed(self.cfg.train.seed)
        self.model = PonderLM(self.cfg.model)
        if init_state is not None:
            fresh = init_from_weights(self.model, init_state)
            self.log(f"initialised from {self.cfg.train.init_from}; fresh: {', '.join(fresh) or 'nothing'}")

    def _restore(self, ck: dict) -> None:
        """Weights and counters of the checkpoint --resume continues from; a run already at
        train.max_steps is marked finished (nothing to train: the run is left exactly as it is)."""
        tc = self.cfg.train
        load_model_weights(self.model, ck["model_state"])
        self.step = int(ck["trainer_state"]["step"])
        self.tokens_seen = int(ck["trainer_state"].get("tokens_seen", 0))
        self.bad_total = int(ck["trainer_state"].get("skipped_steps", 0))
        if self.step == tc.max_steps:
            self.finished = True
            self.log(f"{self.out} is already at train.max_steps={tc.max_steps}; nothing to do")

    def _build_optimizer(self, ck: dict | None) -> None:
        tc = self.cfg.train
        self.model.to(self.env.device)
        self.wrapped = wrap_model(self.model, self.env, self.sharded)
        if tc.compile:
            compile_blocks(self.model)
        fused = self.env.device.type == "cuda"
        self.opt = torch.optim.AdamW(
            param_groups(self.model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=fused
        )
        if ck is not None and ck["optim_state"] is not None:
            load_optimizer_state(self.model, self.opt, ck["optim_state"], self.sharded)

    def _record(self, row: dict[str, Any]) -> None:
        self.metrics.record(row)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    # ----------------------------------------------------------------- loop
    def train_step(self, step: int) -> dict[str, float]:
        tc, mc = self.cfg.train, self.cfg.model
        lr = lr_at(step, tc)
        for g in self.opt.param_groups:
            g["lr"] = lr
        J = jacobi_iters_at(step, tc.seed, mc.jacobi_train_iters)
        lo = self.env.rank * self.per_rank
        sums: dict[str, torch.Tensor] = {}
        self.wrapped.train()
        for m in range(self.accum):
            a = lo + m * self.micro
            x, y = self.train_data.batch(step, tc.batch_size, a, a + self.micro)
            check_ids(y, self.tok_vocab, tc.data_dir)  # y is x shifted by one token plus the window's last token
            check_ids(x[:, :1], self.tok_vocab, tc.data_dir)
            x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
            sync = m == self.accum - 1
            with grad_sync(self.wrapped, sync):
                with self._autocast():
                    out = self.wrapped(x, mode="soft", jacobi_iters=J)
                loss, metrics = ponder_loss(out, y, mc)
                (loss / self.accum).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.float() / self.accum
        # the global gradient norm (clipping when asked); inf/nan when any gradient is not finite
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        keys = sorted(sums)
        vec = torch.stack([sums[k].detach().to(self.env.device) for k in keys] + [grad_norm.detach().float()])
        vec = self.env.all_sum(vec.to(self.env.device)) / self.env.world  # non-finite anywhere -> everywhere
        finite = bool(torch.isfinite(vec).all())
        if finite:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # a bad step leaves weights and optimizer state untouched
        row = {k: float(v) for k, v in zip(keys, vec[:-1].cpu(), strict=True)}
        row.update(lr=lr, jacobi_iters=J, grad_norm=float(vec[-1]), skipped=0 if finite else 1)
        return row

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation in the soft (training) computation and, for PonderLM-3, in the hard-pruned
        inference computation at train.eval_tau, with depth, histogram and inference FLOPs."""
        tc, mc = self.cfg.train, self.cfg.model
        self.wrapped.eval()
        rows = self.val[self.env.rank :: self.env.world]
        # FSDP2: every forward is collective (each block all-gathers its parameters), so every rank
        # runs as many batches as rank 0, which has the most rows; a rank out of rows scores a
        # window and discards it (otherwise rank 0's extra forward waits until dist_timeout_s)
        n_rows = len(self.val[:: self.env.world]) if self.sharded else len(rows)
        modes = ["soft"] + (["hard"] if mc.has_router else [])
        accs = []
        for mode in modes:
            acc = torch.zeros(HIST + mc.max_depth + 1, dtype=torch.float64)
            for i in range(0, n_rows, self.micro):
                w = rows[i : i + self.micro]
                x = (w if len(w) else self.val[:1]).to(self.env.device)
                with self._autocast():
                    sums = score_batch(self.wrapped, mc, x[:, :-1], x[:, 1:], mode=mode, tau=tc.eval_tau)
                if len(w):
                    acc += sums
            accs.append(acc)
        accs = self.env.all_sum(torch.stack(accs)).cpu()
        res: dict[str, float] = {}
        for mode, acc in zip(modes, accs, strict=True):
            for k, v in summarize(acc).items():
                if isinstance(v, list):
                    res.update({f"{mode}_depth_hist/{i}": x for i, x in enumerate(v)})
                else:
                    res[f"{mode}_{k}"] = v
        main = "hard" if mc.has_router else "soft"
        for k in ("loss", "ppl", "mean_depth", "flops_per_token"):
            res[k] = res[f"{main}_{k}"]
        return res

    def val_size(self) -> str:
        """What validation is over: ``64 windows, 8,192 tokens`` (scored positions)."""
        n, L = self.val.shape[0], self.val.shape[1] - 1
        return f"{n} windows, {n * L:,} tokens"

    def save(self) -> None:
        """Write a checkpoint of the current step; never one with non-finite weights."""
        model_state, optim_state = full_state(self.model, self.opt, self.sharded)
        if self.env.is_main:
            bad = [k for k, v in model_state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise TrainingStopped(
                    f"step {self.step}: weights are not finite ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
                    f"no checkpoint written, {last_good(self.out)}: lower train.lr or check the data, then --resume"
                )
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "seed": self.cfg.train.seed,
                     "skipped_steps": self.bad_total}  # fmt: skip
            try:
                save_checkpoint(
                    self.out, self.step, model_state, optim_state, state, self.cfg, self.tokenizer_file,
                    self.cfg.train.keep_last, tokenizer_config=self.tokenizer_config,
                )  # fmt: skip
            except CheckpointWriteError as e:
                raise TrainingStopped(f"{e}; {last_good(self.out)}") from None
        self.env.barrier()

    def run(self) -> dict[str, Any]:
        """Train from the current step to train.max_steps, recording metrics every train.log_interval
        steps, validating every train.eval_interval and checkpointing every train.ckpt_interval
        (both also at the last step). Returns the final step, the seconds this call took and the
        last validation."""
        if self.finished:
            return {"step": self.step, "seconds": 0.0, "val": {}}
        self._log_start()
        bar = self._progress_bar()
        pace = _Pace(time.perf_counter(), self.step, time.perf_counter(), self.tokens_seen)
        pace.rate.add(pace.t_start, self.tokens_seen)
        last_eval: dict[str, float] = {}
        while self.step < self.cfg.train.max_steps:
            row = self._step()
            now = time.perf_counter()
            pace.rate.add(now, self.tokens_seen)
            tps = (self.tokens_seen - pace.tok_last) / max(now - pace.t_last, 1e-9)
            self._count_skipped(row)
            self._log_step(row, tps, now, pace, bar)
            evaluated = self._evaluate_on_cadence(bar)
            if evaluated is not None:
                last_eval = evaluated
            self._save_on_cadence()
        self._close_outputs(bar)
        return {"step": self.step, "seconds": time.perf_counter() - pace.t_start, "val": last_eval,
                "val_size": self.val_size()}  # fmt: skip

    def _log_start(self) -> None:
        """The threads of this process and why (per process under torchrun); then one line about
        the run, when it starts from step 0."""
        tc = self.cfg.train
        if self.env.is_main:
            self.log(threads.describe() + (" per process" if self.env.world > 1 else ""))
        if self.env.is_main and self.step == 0:
            n = self.model.num_parameters()
            fl = flops_mod.training_flops_per_token(self.cfg.model, tc.seq_len)
            self.log(
                f"{self.cfg.model.method}: {n:,} parameters, K={self.cfg.model.max_depth}, "
                f"{tc.max_steps} steps x {tc.batch_size * tc.seq_len:,} tokens, {self.env.world} process(es) on "
                f"{self.env.device}, {fl / 1e6:.1f} MFLOPs/token (train)"
            )

    def _progress_bar(self):
        """A tqdm bar on the main process with train.progress, else None."""
        tc = self.cfg.train
        if not (self.env.is_main and tc.progress and redraws()):  # no bar where it cannot be drawn
            return None
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (logs, CI); metric lines still go to stdout.
        # tqdm's own rate and remaining time are left out: the postfix shows ours (one rate, its ETA)
        return tqdm(total=tc.max_steps, initial=self.step, unit="step", dynamic_ncols=True, leave=False, disable=None,
                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")  # fmt: skip

    def _step(self) -> dict[str, float]:
        """Train the next step and count it; returns its metrics row."""
        tc = self.cfg.train
        step = self.step + 1
        fault_point(f"rank{self.env.rank}", step)  # tests: a rank dies here
        row = self.train_step(step)
        self.step = step
        self.tokens_seen += tc.batch_size * tc.seq_len
        return row

    def _count_skipped(self, row: dict[str, float]) -> None:
        """A skipped (non-finite) step is logged and recorded; more than train.max_bad_steps of them
        in a row stop the run."""
        tc, step = self.cfg.train, self.step
        if not row["skipped"]:
            self.bad_in_row = 0
            return
        self.bad_in_row += 1
        self.bad_total += 1
        if self.env.is_main:
            self.log(f"step {step}: non-finite loss or gradient; step skipped ({self.bad_in_row} in a row, "
                     f"{self.bad_total} in all)")  # fmt: skip
        self._record({"split": "train", "step": step, "tokens": self.tokens_seen, **row})
        if self.bad_in_row > tc.max_bad_steps:
            raise TrainingStopped(
                f"{self.bad_in_row} non-finite steps in a row at step {step} (train.max_bad_steps="
                f"{tc.max_bad_steps}); stopped, {last_good(self.out)}: lower train.lr or check the data, "
                "then --resume"
            )

    def _log_step(self, row: dict[str, float], tps: float, now: float, pace: _Pace, bar) -> None:
        """The progress bar after every step; a metrics record (and, without a visible bar, a log
        line) every train.log_interval steps and at the last."""
        tc, step = self.cfg.train, self.step
        rate, eta = pace.shown((tc.max_steps - step) * tc.batch_size * tc.seq_len)
        if bar is not None:
            bar.update(1)
            if not row["skipped"]:
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=rate, depth=f"{row['mean_depth']:.2f}", eta=eta)
        if row["skipped"] or not tc.log_interval or not (step % tc.log_interval == 0 or step == tc.max_steps):
            return
        self._record({"split": "train", "step": step, "tokens": self.tokens_seen, "tokens_per_s": tps, **row})
        if self.env.is_main and (bar is None or bar.disable):
            self.log(
                f"step {step}/{tc.max_steps}  loss {row['loss']:.4f}  depth {row['mean_depth']:.2f}  "
                f"{rate} tok/s  eta {eta}"
            )
        pace.t_last, pace.tok_last = now, self.tokens_seen

    def val_computation(self) -> str:
        """Which computation the validation loss is: it is not the experiment report's (hard, Jacobi
        passes until the latents settle), so a reader comparing the two sees why the last digit may differ."""
        mc = self.cfg.model
        how = f"hard at tau {self.cfg.train.eval_tau:g}" if mc.has_router else "soft"
        return f"{how}, {mc.jacobi_iters} Jacobi passes" if mc.uses_jacobi else how

    def _evaluate_on_cadence(self, bar) -> dict[str, float] | None:
        """Validate (and record it) every train.eval_interval steps and at the last; None otherwise."""
        tc, step = self.cfg.train, self.step
        if not (step == tc.max_steps or (tc.eval_interval and step % tc.eval_interval == 0)):
            return None
        res = self.evaluate()
        self._record({"split": "val", "step": step, "tokens": self.tokens_seen, **res})
        if self.env.is_main:
            (bar.write if bar is not None and not bar.disable else self.log)(
                f"step {step}: val loss {res['loss']:.4f} ({self.val_computation()}; ppl {res['ppl']:.2f}, "
                f"{self.val_size()}), depth {res['mean_depth']:.2f}"
            )
        return res

    def _save_on_cadence(self) -> None:
        """A checkpoint every train.ckpt_interval steps and at the last."""
        tc, step = self.cfg.train, self.step
        if step == tc.max_steps or (tc.ckpt_interval and step % tc.ckpt_interval == 0):
            self.save()

    def _close_outputs(self, bar) -> None:
        if bar is not None:
            bar.close()
        self.metrics.close()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        self.env.close()


def init_from_weights(model: PonderLM, state: dict[str, torch.Tensor]) -> list[str]:
    """Load a backbone into a model of any method; returns the parameters left freshly initialised
    (the router, pause embeddings). Anything else missing or unexpected is an error."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    fresh = [k for k in missing if k.startswith(("router.", "pause_embed."))]
    bad = [k for k in missing if k not in fresh]
    if bad or unexpected:
        raise CheckpointError(f"--init-from weights do not fit: missing {bad[:4]}, unexpected {unexpected[:4]}")
    return fresh


def train(
    cfg: RunConfig, explicit: set[str] | None = None, *, resume: bool = False, overwrite: bool = False, log=print
):
    """Build a Trainer, run it, and tear down the process group."""
    trainer = Trainer(cfg, explicit, resume=resume, overwrite=overwrite, log=log)
    try:
        return trainer.run()
    finally:
        trainer.close()

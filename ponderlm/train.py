"""The trainer: AdamW with warmup + cosine, gradient accumulation, clipping, bf16 autocast on GPU,
optional torch.compile, DDP or FSDP2 under torchrun, periodic validation in both the training
(soft) and inference (hard-pruned) computations, atomic checkpoints and exact resume.

Determinism: the data of step s and its Jacobi count are pure functions of (seed, s), and the
learning rate is a function of s, so resuming from a checkpoint continues exactly as an
uninterrupted run would (on CPU, step for step), with any number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import flops as flops_mod
from . import threads
from .checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    fault_point,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    newest_verified,
    remove_stale_temporaries,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import ConfigError, RunConfig, save_run_config
from .data import DataError, TokenShards, TrainBatches, check_dataset, eval_windows, remember_verified
from .data.tokenizer import same_tokenizer
from .device import resolve_device
from .errors import describe_os_error
from .eval.perplexity import HIST, score_batch, summarize
from .limits import check_training_fits
from .losses import ponder_loss
from .model import PonderLM
from .owned import (
    DirLock,
    atomic_write,
    check_disjoint,
    check_replaceable,
    is_empty_dir,
    is_kind,
    make_owned_dir,
    remove_owned,
)
from .progress import Rate, clock


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr, then cosine to cfg.lr * cfg.min_lr_ratio at cfg.max_steps (1-based)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def jacobi_iters_at(step: int, seed: int, choices: tuple[int, ...]) -> int:
    """The Jacobi curriculum: J for step s, drawn uniformly, identical on every rank."""
    return int(np.random.default_rng([seed, step, 7]).choice(list(choices)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class DistEnv:
    """World size / rank from torchrun's environment; a no-op in a single process."""

    def __init__(self, device_pref: str, timeout_s: float = 600.0) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # "cuda" means this process's GPU (LOCAL_RANK under torchrun), never an index-less device
        self.device = resolve_device(device_pref, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            # a collective that waits longer than this (a peer died) raises instead of hanging forever
            dist.init_process_group(
                backend="nccl" if self.device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


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
        tc = cfg.train
        inputs = [Path(tc.data_dir)] + ([Path(tc.init_from)] if tc.init_from else [])
        check_disjoint(self.out, inputs, "train.out_dir")
        self.replace_run = self._check_run_dir(resume, overwrite)  # nothing is created or deleted before this

        # data and tokenizer decide the vocabulary unless the user set it
        meta = check_dataset(Path(tc.data_dir), verify_hashes=tc.verify_data, remember=False)
        self.tokenizer_file = Path(tc.data_dir) / meta["tokenizer"]["file"]
        tok_vocab = int(meta["tokenizer"]["vocab_size"])
        self.init_state = None
        if tc.init_from:  # continued pretraining: the backbone (sizes and weights) comes from there
            self.init_state, explicit = self._init_source(tc.init_from, cfg, explicit)
        resolve_model_config(cfg, explicit, tok_vocab)
        self._check_batching()
        # sizes that cannot fit are refused here, naming the keys, not as an allocator's traceback later
        bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and self.env.device.type == "cuda")
        check_training_fits(cfg.model, self.micro, tc.seq_len, self.env.world, self.env.device, 2 if bf16 else 4)

        self.train_data = TrainBatches(TokenShards(tc.data_dir, "train"), tc.seq_len, tc.seed)
        self.val = eval_windows(TokenShards(tc.data_dir, "val"), tc.seq_len, tc.eval_windows)
        self.tok_vocab = tok_vocab
        self._check_ids(self.val)

        self._build_model()
        self.step = 0
        self.tokens_seen = 0
        self.bad_in_row = self.bad_total = 0  # non-finite steps skipped: current streak, whole run
        start, ck = self._resume_point() if resume else (None, None)
        if ck is not None:
            self._restore(ck)
            if self.finished:
                return
        self._build_optimizer(ck)
        self._prepare_run_dir(resume)
        if ck is not None:
            self.log(f"resumed from {start} at step {self.step}")
            self._truncate_metrics(self.step)

        self.metrics_file = self.out / "metrics.jsonl"
        self.tb = self.wandb = None
        if self.env.is_main:
            save_run_config(cfg, self.out / "config.yaml")
            self._open_trackers()

    def _build_model(self) -> None:
        """The model, seeded by train.seed; with train.init_from, holding the source's backbone."""
        torch.manual_seed(self.cfg.train.seed)
        self.model = PonderLM(self.cfg.model)
        if self.init_state is not None:
            fresh = init_from_weights(self.model, self.init_state)
            self.log(f"initialised from {self.cfg.train.init_from}; fresh: {', '.join(fresh) or 'nothing'}")
            self.init_state = None

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

    def _check_batching(self) -> None:
        tc = self.cfg.train
        W = self.env.world
        if tc.batch_size % W:
            raise ConfigError(f"train.batch_size {tc.batch_size} is not divisible by the {W} processes")
        self.per_rank = tc.batch_size // W
        self.micro = tc.micro_batch_size or self.per_rank
        if self.per_rank % self.micro:
            raise ConfigError(f"per-process batch {self.per_rank} is not divisible by micro_batch_size {self.micro}")
        self.accum = self.per_rank // self.micro

    def _resume_point(self) -> tuple[Path | None, dict | None]:
        """The checkpoint --resume continues from, checked against the config and the dataset.

        A run without any checkpoint yet (killed before its first) starts from step 0; a run whose
        checkpoints all fail to verify is refused: resuming must never silently start over."""
        if not list_checkpoints(self.out):
            self.log(f"{self.out}: no checkpoint yet; starting from step 0")
            return None, None
        start, problems = newest_verified(self.out)
        if start is None:
            raise CheckpointError(
                f"--resume: no checkpoint in {self.out} verifies (newest: {problems[0]}); nothing was changed. "
                "Restore the checkpoint, or start over with --overwrite instead of --resume"
            )
        for p in problems:
            warnings.warn(f"skipping {p}", stacklevel=2)
        ck = load_checkpoint(start)
        cfg = self.cfg
        if ck["model_config"] != cfg.model:
            theirs, mine = ck["model_config"].to_dict(), cfg.model.to_dict()
            diff = ", ".join(
                f"model.{k}={mine[k]!r} (checkpoint: {theirs[k]!r})" for k in sorted(mine) if mine[k] != theirs[k]
            )
            raise ConfigError(
                f"--resume with another model config than {start}: {diff}; drop those overrides or "
                "choose another train.out_dir"
            )
        tok = start / "tokenizer.json"
        if not tok.is_file() or not same_tokenizer(tok, self.tokenizer_file):
            raise ConfigError(
                f"--resume with a dataset tokenized differently from {start}: {cfg.train.data_dir} does not use the "
                "checkpoint's tokenizer.json (its ids would mean other strings); use the run's dataset"
            )
        step = int(ck["trainer_state"]["step"])
        if step > cfg.train.max_steps:
            raise ConfigError(
                f"--resume: {start} is at step {step}, beyond train.max_steps={cfg.train.max_steps}; nothing was "
                f"changed. Set train.max_steps above {step} to train further"
            )
        return start, ck

    def _build_optimizer(self, ck: dict | None) -> None:
        tc = self.cfg.train
        self.model.to(self.env.device)
        self.autocast_dtype = None
        if tc.dtype == "bf16" or (tc.dtype == "auto" and self.env.device.type == "cuda"):
            self.autocast_dtype = torch.bfloat16
        self.wrapped = self._wrap(self.model)
        fused = self.env.device.type == "cuda"
        self.opt = torch.optim.AdamW(
            param_groups(self.model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=fused
        )
        if ck is not None and ck["optim_state"] is not None:
            self._load_optimizer(ck["optim_state"])

    # ---------------------------------------------------------------- setup
    def _init_source(self, src: str, cfg: RunConfig, explicit: set[str]):
        """Adopt the backbone of a source checkpoint for --init-from; returns (weights, explicit keys)."""
        ck_dir = resolve_checkpoint(src)
        ck = load_checkpoint(ck_dir, with_optimizer=False)
        src_cfg = ck["model_config"]
        for name in BACKBONE_FIELDS:
            mine, theirs = getattr(cfg.model, name), getattr(src_cfg, name)
            if f"model.{name}" in explicit and mine != theirs:
                raise ConfigError(
                    f"model.{name}={mine!r} conflicts with --init-from {src} ({theirs!r}); drop the override"
                )
            setattr(cfg.model, name, theirs)
        if "model.max_seq_len" not in explicit:
            cfg.model.max_seq_len = src_cfg.max_seq_len
        tok = ck_dir / "tokenizer.json"
        if not tok.is_file() or not same_tokenizer(tok, self.tokenizer_file):
            raise ConfigError(
                f"{cfg.train.data_dir} was not tokenized with {src}'s tokenizer; prepare it with "
                f"`ponderlm data prepare --tokenizer {tok} ...`"
            )
        return ck["model_state"], explicit | {"model.vocab_size"}

    def _check_run_dir(self, resume: bool, overwrite: bool) -> bool:
        """Decide what happens to train.out_dir; True when an existing run will be replaced.

        --resume needs a ponderlm run (or nothing yet); --overwrite replaces only a run that is
        verifiably ponderlm's and holds nothing else; without either, an existing run is refused."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"train.out_dir {out} is a file; choose a directory")
        if not out.exists() or is_empty_dir(out):
            return False
        if resume:
            if not is_kind(out, "run"):
                raise ConfigError(f"{out} is not a ponderlm run; nothing to resume (choose another train.out_dir)")
            return False
        if not overwrite:
            if is_kind(out, "run"):
                raise ConfigError(
                    f"{out} already holds a run; pass --resume to continue it or --overwrite to start over"
                )
            raise ConfigError(
                f"{out} is not empty and is not a ponderlm run (no config.yaml or checkpoints/); "
                "choose another train.out_dir"
            )
        return check_replaceable(out, "run", overwrite=True, exists_hint="", choose="train.out_dir")

    def _check_ids(self, tokens: torch.Tensor) -> None:
        """Token ids beyond the tokenizer's entries: the dataset does not match its tokenizer.json."""
        top = int(tokens.max()) if tokens.numel() else 0
        if top >= self.tok_vocab:
            raise DataError(
                f"{self.cfg.train.data_dir}: token id {top} is outside the tokenizer's {self.tok_vocab} entries "
                "(the dataset does not match its tokenizer.json); rebuild it with `ponderlm data prepare --overwrite`"
            )

    def _prepare_run_dir(self, resume: bool) -> None:
        """The first writes of the run: replace an old run (--overwrite, checked), clear what a
        killed writer left (--resume), create and mark the directory."""
        if self.env.is_main:
            if self.replace_run:
                remove_owned(self.out, "run")
            if resume:
                for p in remove_stale_temporaries(self.out):
                    self.log(f"removed {p.name}, a checkpoint whose writing or deletion was interrupted")
            make_owned_dir(self.out, "run")
            remember_verified(self.cfg.train.data_dir)  # the run goes ahead: its shards need no re-hashing next time
        if self.env.world > 1:
            dist.barrier()
        self.out.mkdir(parents=True, exist_ok=True)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        tc = self.cfg.train
        wrapped: torch.nn.Module = model
        if self.env.world > 1 and tc.dist == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # PonderOutput carries views (e.g. the mixed hidden state); nothing modifies them in place
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        elif self.env.world > 1:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if tc.compile:
            compile_blocks(model)
        return wrapped

    def _full_state(self) -> tuple[dict, dict]:
        if self.env.world > 1 and self.cfg.train.dist == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (
                get_model_state_dict(self.model, options=opts),
                get_optimizer_state_dict(self.model, self.opt, options=opts),
            )
        return self.model.state_dict(), self.opt.state_dict()

    def _load_optimizer(self, state: dict) -> None:
        if self.env.world > 1 and self.cfg.train.dist == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.opt, state, options=StateDictOptions(full_state_dict=True))
        else:
            self.opt.load_state_dict(state)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines a killed run wrote after the checkpoint we resume from."""
        f = self.out / "metrics.jsonl"
        if not self.env.is_main or not f.is_file():
            return
        keep, dropped = [], 0
        for ln in f.read_text(errors="replace").splitlines():
            try:
                row = json.loads(ln)
            except ValueError:  # a line cut short by a crash: not a record
                dropped += int(bool(ln.strip()))
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(ln)
        if dropped:
            self.log(f"{f}: dropped {dropped} unreadable line(s) (cut short by a crash)")
        atomic_write(f, "".join(ln + "\n" for ln in keep))

    def _open_trackers(self) -> None:
        tc = self.cfg.train
        if tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        if tc.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("train.wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=tc.wandb_project, config=self.cfg.to_dict(), dir=str(self.out))

    def _record(self, row: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        row = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}  # strict JSON
        try:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise TrainingStopped(
                f"{describe_os_error(e, f'writing {self.metrics_file}')}; {self._last_good()}"
            ) from None
        scalars = {f"{row['split']}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if row.get("skipped"):
            scalars = {f"{row['split']}/skipped": 1}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

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
            self._check_ids(y)  # y is x shifted by one token plus the window's last token
            self._check_ids(x[:, :1])
            x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
            sync = m == self.accum - 1
            ctx = contextlib.nullcontext()
            if not sync and isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel):
                ctx = self.wrapped.no_sync()
            with ctx:
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
        fsdp = self.env.world > 1 and tc.dist == "fsdp"
        n_rows = len(self.val[:: self.env.world]) if fsdp else len(rows)
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

    def _last_good(self) -> str:
        """Where the run can be resumed from, stated as it is on disk."""
        ck = latest_checkpoint(self.out)
        if ck is None:
            return f"no checkpoint of this run was written yet ({self.out})"
        return f"the last good checkpoint, {ck}, is intact"

    def save(self) -> None:
        """Write a checkpoint of the current step; never one with non-finite weights."""
        model_state, optim_state = self._full_state()
        if self.env.is_main:
            bad = [k for k, v in model_state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise TrainingStopped(
                    f"step {self.step}: weights are not finite ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
                    f"no checkpoint written, {self._last_good()}: lower train.lr or check the data, then --resume"
                )
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "seed": self.cfg.train.seed,
                     "skipped_steps": self.bad_total}  # fmt: skip
            try:
                save_checkpoint(
                    self.out, self.step, model_state, optim_state, state, self.cfg, self.tokenizer_file,
                    self.cfg.train.keep_last,
                )  # fmt: skip
            except CheckpointWriteError as e:
                raise TrainingStopped(f"{e}; {self._last_good()}") from None
        if self.env.world > 1:
            dist.barrier()

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
        if not (self.env.is_main and tc.progress):
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
                f"{tc.max_bad_steps}); stopped, {self._last_good()}: lower train.lr or check the data, "
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

    def _evaluate_on_cadence(self, bar) -> dict[str, float] | None:
        """Validate (and record it) every train.eval_interval steps and at the last; None otherwise."""
        tc, step = self.cfg.train, self.step
        if not (step == tc.max_steps or (tc.eval_interval and step % tc.eval_interval == 0)):
            return None
        res = self.evaluate()
        self._record({"split": "val", "step": step, "tokens": self.tokens_seen, **res})
        if self.env.is_main:
            (bar.write if bar is not None and not bar.disable else self.log)(
                f"step {step}: val loss {res['loss']:.4f} (ppl {res['ppl']:.2f}, {self.val_size()}), "
                f"depth {res['mean_depth']:.2f}"
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
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        self.env.close()


def resolve_model_config(cfg: RunConfig, explicit: set[str], tok_vocab: int) -> None:
    """Fill in what the data decides unless the user set it: the vocabulary (the tokenizer's size
    rounded up to a multiple of 64) and a context at least train.seq_len; then validate."""
    if "model.vocab_size" not in explicit:
        cfg.model.vocab_size = -(-tok_vocab // 64) * 64
    elif cfg.model.vocab_size < tok_vocab:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} < the tokenizer's {tok_vocab} entries")
    if "model.max_seq_len" not in explicit:
        cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.train.seq_len)
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len {cfg.train.seq_len} > model.max_seq_len {cfg.model.max_seq_len}")
    cfg.model.validate()


class TrainingStopped(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row); checkpoints are intact."""


# the fields that fix the shapes and the computation of the shared backbone
BACKBONE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "rope_theta", "norm_eps",
                   "tie_embeddings", "scale_embeds", "embed_scale_factor")  # fmt: skip


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

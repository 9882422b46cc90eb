"""A training run's directory (``train.out_dir``) and what is checked before its first write.

Pre-flight, nothing written: what happens to the directory (:func:`check_run_dir`), the model
config that the data and ``--init-from`` decide (:func:`resolve_model_config`,
:func:`init_source`), the batch split (:func:`batch_split`), token ids against the tokenizer
(:func:`check_ids`) and, with ``--resume``, the checkpoint the run continues from
(:func:`resume_point`). Then the first writes (:func:`prepare_run_dir`), and the run's
metrics.jsonl with its trackers (:class:`MetricsLog`)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ponderlm.data import remember_verified
from ponderlm.data.tokenizer import same_tokenizer
from ponderlm.errors import CheckpointError, ConfigError, DataError, TrainingStopped, describe_os_error
from ponderlm.owned import atomic_write, check_replaceable, is_empty_dir, is_kind, make_owned_dir, remove_owned
from ponderlm.runs.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_verified,
    remove_stale_temporaries,
    resolve_checkpoint,
)
from ponderlm.runs.config import RunConfig
from ponderlm.runs.directory import RUN

if TYPE_CHECKING:
    from ponderlm.training.distributed import DistEnv

# the fields that fix the shapes and the computation of the shared backbone
BACKBONE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "rope_theta", "norm_eps",
                   "tie_embeddings", "scale_embeds", "embed_scale_factor")  # fmt: skip


# ------------------------------------------------------------- pre-flight
def check_run_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """Decide what happens to train.out_dir; True when an existing run will be replaced.

    --resume needs a ponderlm run (or nothing yet); --overwrite replaces only a run that is
    verifiably ponderlm's and holds nothing else; without either, an existing run is refused."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir {out} is a file; choose a directory")
    if not out.exists() or is_empty_dir(out):
        return False
    if resume:
        if not is_kind(out, RUN):
            raise ConfigError(f"{out} is not a ponderlm run; nothing to resume (choose another train.out_dir)")
        return False
    if not overwrite:
        if is_kind(out, RUN):
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
        raise ConfigError(
            f"{out} is not empty and is not a ponderlm run (no config.yaml or checkpoints/); "
            "choose another train.out_dir"
        )
    return check_replaceable(out, RUN, overwrite=True, exists_hint="", choose="train.out_dir")


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


def init_source(src: str, cfg: RunConfig, explicit: set[str], tokenizer_file: Path):
    """Adopt the backbone of a source checkpoint for --init-from; returns (weights, explicit keys,
    the source checkpoint's directory)."""
    ck_dir = resolve_checkpoint(src)
    ck = load_checkpoint(ck_dir, with_optimizer=False)
    src_cfg = ck["model_config"]
    for name in BACKBONE_FIELDS:
        mine, theirs = getattr(cfg.model, name), getattr(src_cfg, name)
        if f"model.{name}" in explicit and mine != theirs:
            raise ConfigError(f"model.{name}={mine!r} conflicts with --init-from {src} ({theirs!r}); drop the override")
        setattr(cfg.model, name, theirs)
    if "model.max_seq_len" not in explicit:
        cfg.model.max_seq_len = src_cfg.max_seq_len
    tok = ck_dir / "tokenizer.json"
    if not tok.is_file() or not same_tokenizer(tok, tokenizer_file):
        raise ConfigError(
            f"{cfg.train.data_dir} was not tokenized with {src}'s tokenizer; prepare it with "
            f"`ponderlm data prepare --tokenizer {tok} ...`"
        )
    return ck["model_state"], explicit | {"model.vocab_size"}, ck_dir


def carried_tokenizer_config(*checkpoints: Path | None) -> Path | None:
    """The ``tokenizer_config.json`` (chat template, special tokens) a run's checkpoints carry: the one
    beside the checkpoint it resumes from, else the one of its --init-from source (a converted
    model's), else none. The dataset's tokenizer.json is checked to be theirs, so it applies."""
    for ck in checkpoints:
        if ck is not None and (Path(ck) / "tokenizer_config.json").is_file():
            return Path(ck) / "tokenizer_config.json"
    return None


def batch_split(tc, world: int) -> tuple[int, int, int]:
    """(rows per process, micro-batch rows, micro-batches per step) of train.batch_size over ``world`` processes."""
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size {tc.batch_size} is not divisible by the {world} processes")
    per_rank = tc.batch_size // world
    micro = tc.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"per-process batch {per_rank} is not divisible by micro_batch_size {micro}")
    return per_rank, micro, per_rank // micro


def check_ids(tokens: torch.Tensor, tok_vocab: int, data_dir: str) -> None:
    """Token ids beyond the tokenizer's entries: the dataset does not match its tokenizer.json."""
    top = int(tokens.max()) if tokens.numel() else 0
    if top >= tok_vocab:
        raise DataError(
            f"{data_dir}: token id {top} is outside the tokenizer's {tok_vocab} entries "
            "(the dataset does not match its tokenizer.json); rebuild it with `ponderlm data prepare --overwrite`"
        )


def resume_point(out: Path, cfg: RunConfig, tokenizer_file: Path, log) -> tuple[Path | None, dict | None]:
    """The checkpoint --resume continues from, checked against the config and the dataset.

    A run without any checkpoint yet (killed before its first) starts from step 0; a run whose
    checkpoints all fail to verify is refused: resuming must never silently start over."""
    if not list_checkpoints(out):
        log(f"{out}: no checkpoint yet; starting from step 0")
        return None, None
    start, problems = newest_verified(out)
    if start is None:
        raise CheckpointError(
            f"--resume: no checkpoint in {out} verifies (newest: {problems[0]}); nothing was changed. "
            "Restore the checkpoint, or start over with --overwrite instead of --resume"
        )
    for p in problems:
        warnings.warn(f"skipping {p}", stacklevel=2)
    ck = load_checkpoint(start)
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
    if not tok.is_file() or not same_tokenizer(tok, tokenizer_file):
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


# ----------------------------------------------------------- first writes
def prepare_run_dir(out: Path, env: DistEnv, replace: bool, resume: bool, data_dir: str, log) -> None:
    """The first writes of the run: replace an old run (--overwrite, checked), clear what a
    killed writer left (--resume), create and mark the directory."""
    if env.is_main:
        if replace:
            remove_owned(out, RUN)
        if resume:
            for p in remove_stale_temporaries(out):
                log(f"removed {p.name}, a checkpoint whose writing or deletion was interrupted")
        make_owned_dir(out, RUN)
        remember_verified(data_dir)  # the run goes ahead: its shards need no re-hashing next time
    env.barrier()
    out.mkdir(parents=True, exist_ok=True)


def last_good(out: Path) -> str:
    """Where the run can be resumed from, stated as it is on disk."""
    ck = latest_checkpoint(out)
    if ck is None:
        return f"no checkpoint of this run was written yet ({out})"
    return f"the last good checkpoint, {ck}, is intact"


class MetricsLog:
    """The run's metrics.jsonl (one JSON record a line), mirrored to TensorBoard and W&B when
    train.tensorboard / train.wandb ask; written by the main process only."""

    def __init__(self, out: Path, is_main: bool) -> None:
        self.out, self.is_main = out, is_main
        self.file = out / "metrics.jsonl"
        self.tb = self.wandb = None

    def truncate(self, step: int, log) -> None:
        """Drop metric lines a killed run wrote after the checkpoint we resume from."""
        f = self.file
        if not self.is_main or not f.is_file():
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
            log(f"{f}: dropped {dropped} unreadable line(s) (cut short by a crash)")
        atomic_write(f, "".join(ln + "\n" for ln in keep))

    def open_trackers(self, cfg: RunConfig) -> None:
        tc = cfg.train
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
            self.wandb = wandb.init(project=tc.wandb_project, config=cfg.to_dict(), dir=str(self.out))

    def record(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}  # strict JSON
        try:
            with open(self.file, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise TrainingStopped(f"{describe_os_error(e, f'writing {self.file}')}; {last_good(self.out)}") from None
        scalars = {f"{row['split']}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if row.get("skipped"):
            scalars = {f"{row['split']}/skipped": 1}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

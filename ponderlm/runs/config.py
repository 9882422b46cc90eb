"""The run configuration: how a model is trained (:class:`TrainConfig`) and what a training run is
(:class:`RunConfig`, saved as ``config.yaml`` in the run directory), read from and written to YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ponderlm.errors import ConfigError
from ponderlm.model.config import ModelConfig, atomic_write_text, check_finite_floats, check_tau

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; seeds stay non-negative and signed-safe
# more CPU threads than any machine has cores: OpenMP allocated per-thread state for 10**9 (216 GB) and aborted
MAX_THREADS = 4096
# a year: longer collective timeouts are typos (and beyond 10**14 s, Python's timedelta overflows)
MAX_DIST_TIMEOUT_S = 365 * 24 * 3600


@dataclass
class TrainConfig:
    # --- data and output ---
    data_dir: str = "data/default"  # a prepared dataset (`ponderlm data prepare`)
    out_dir: str = "runs/default"  # run directory: config, metrics, checkpoints
    seq_len: int = 256  # tokens per training sequence
    # --- batch ---
    batch_size: int = 32  # global batch, sequences per optimizer step (all ranks, all micro-steps)
    micro_batch_size: int = 0  # sequences per rank per forward; 0 = batch_size / world_size
    # --- optimisation ---
    max_steps: int = 1000
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup
    weight_decay: float = 0.1  # on matrices only (no decay on norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    max_bad_steps: int = 5  # non-finite loss/gradient: skip the step; stop after this many in a row
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 200  # steps between validations (and at the end); 0 = only at the end
    eval_windows: int = 64  # validation sequences (fixed windows of the val split)
    eval_tau: float = 1e-4  # tau for the hard-pruned (inference) validation of PonderLM-3
    log_interval: int = 10  # steps between train-metric lines
    ckpt_interval: int = 500  # steps between checkpoints (and at the end); 0 = only at the end
    keep_last: int = 3  # checkpoints kept
    progress: bool = True  # live progress bar on rank 0
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "ponderlm"
    # --- runtime ---
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    dist: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard), when launched with torchrun
    dist_timeout_s: int = 600  # a collective waiting longer (a peer process died) fails instead of hanging
    threads: int = 0  # torch CPU threads; 0 = PyTorch's default
    init_from: str = ""  # run/checkpoint (e.g. from `ponderlm convert`) whose weights start this run
    verify_data: bool = True  # check every shard's sha256 against meta.json at start (cached by mtime)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        check_finite_floats(self, "train.")
        for name in ("seq_len", "batch_size", "max_steps", "eval_windows", "keep_last"):
            need(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "warmup_steps", "eval_interval", "log_interval", "ckpt_interval", "threads",
                     "max_bad_steps"):  # fmt: skip
            need(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        # a seed the data order (numpy) and the initialisation (torch) both take: checked here, not at step 1
        need(0 <= self.seed <= SEED_MAX, f"train.seed must be an integer in [0, 2**63 - 1], got {self.seed}")
        need(self.dist_timeout_s >= 1, f"train.dist_timeout_s must be >= 1 (seconds), got {self.dist_timeout_s}")
        need(self.dist_timeout_s <= MAX_DIST_TIMEOUT_S,
             f"train.dist_timeout_s must be <= {MAX_DIST_TIMEOUT_S} (a year), got {self.dist_timeout_s}")  # fmt: skip
        need(self.threads <= MAX_THREADS, f"train.threads must be in [0, {MAX_THREADS}], got {self.threads}")
        for name in ("data_dir", "out_dir"):
            need(str(getattr(self, name)).strip() != "", f"train.{name} must name a directory, got an empty string")
        need(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2 must be in [0, 1)")
        need(self.weight_decay >= 0 and self.grad_clip >= 0, "train.weight_decay and grad_clip must be >= 0")
        need(self.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        need(self.dist in ("ddp", "fsdp"), f"train.dist must be ddp or fsdp, got {self.dist!r}")
        check_tau(self.eval_tau)


@dataclass
class RunConfig:
    """What a training run is: the model and how it is trained. Saved as config.yaml in the run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train)}


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; ConfigError with the file name otherwise."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}" if not p.exists() else f"{what} file {p} is not a file")
    from ponderlm.errors import InputTooLarge
    from ponderlm.limits import MAX_METADATA_BYTES, read_limited

    try:  # bounded: a config is a few KB
        raw = yaml.safe_load(read_limited(p, MAX_METADATA_BYTES, f"{what} file").decode("utf-8")) or {}
    except InputTooLarge as e:
        raise ConfigError(str(e)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text YAML file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:  # the YAML parser recurses once per level of nesting
        raise ConfigError(f"{p}: not valid YAML (nested too deeply)") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of {what} sections, got {type(raw).__name__}")
    bad = [k for k, v in raw.items() if k in ("model", "train") and not isinstance(v, dict)]
    if bad:
        raise ConfigError(f"{p}: section {bad[0]!r} must be a mapping of keys to values")
    return raw


def load_run_config(
    path: str | Path | dict | None = None, overrides: list[str] | None = None
) -> tuple[RunConfig, set[str]]:
    """Merge a YAML preset (a path, or an already-parsed mapping) and ``key=value`` dotted
    overrides onto the typed schema.

    Unknown keys and mistyped values raise ConfigError naming the key. Returns the config and the
    set of dotted keys the user gave explicitly (so e.g. an unset vocab_size can come from the data).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw: dict[str, Any] = {}
    if isinstance(path, dict):
        raw = path
    elif path is not None:
        raw = read_yaml_mapping(path, "config")
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key=value, e.g. model.d_model=256")
    try:
        schema = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(schema, OmegaConf.create(raw), OmegaConf.from_dotlist(list(overrides or [])))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        raise ConfigError(f"config error at {key}: {msg}" if key else f"config error: {msg}") from None
    explicit = {f"{sec}.{k}" for sec, d in raw.items() if isinstance(d, dict) for k in d}
    explicit |= {o.split("=", 1)[0].strip() for o in overrides or []}
    return cfg, explicit


def save_run_config(cfg: RunConfig, path: str | Path) -> None:
    import yaml

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))

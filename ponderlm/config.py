"""Typed model configuration, validated on construction and saved next to every checkpoint.

Where a field is marked *(inferred)* the PonderLM-3 paper does not pin the choice down; the
default is our reading (see ``docs/DESIGN_NOTES.md``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; seeds stay non-negative and signed-safe
# more CPU threads than any machine has cores: OpenMP allocated per-thread state for 10**9 (216 GB) and aborted
MAX_THREADS = 4096
# a year: longer collective timeouts are typos (and beyond 10**14 s, Python's timedelta overflows)
MAX_DIST_TIMEOUT_S = 365 * 24 * 3600
SLOT_INPUTS = ("none", "learned", "hidden")
ROUND_INPUTS = ("none", "residual", "soft_token")


@dataclass(frozen=True)
class MethodSpec:
    """What a method *is*, in the terms the rest of the code asks about. No module outside this
    one compares method names: the model, the FLOPs counter, decoding and the trainer ask these
    capabilities (through :class:`ModelConfig`), so a new method is a row of METHOD_SPECS plus
    its tests (docs/ADDING_A_METHOD.md)."""

    # input of a latent slot k >= 1 of the K slots interleaved after each token:
    #   "none" (no latent slots), "learned" (K learned embeddings: pause tokens),
    #   "hidden" (the final hidden state of slot k-1: a latent thought, solved by Jacobi in parallel)
    slot_input: str = "none"
    # input of round r >= 1 of the K extra full passes over the tokens:
    #   "none" (one pass), "residual" (the residual stream of round r-1: a looped transformer),
    #   "soft_token" (e_t + softmax(head(h)) @ E of round r-1's normed output: PonderLM-1)
    round_input: str = "none"
    # whether every round ends in the final norm ("every"), or only the last one ("last")
    round_norm: str = "last"
    # a router picks each token's depth in 0..K (PonderLM-3); otherwise every token takes all K
    router: bool = False

    def __post_init__(self) -> None:
        if self.slot_input not in SLOT_INPUTS or self.round_input not in ROUND_INPUTS:
            raise ConfigError(f"unknown method capability in {self}")
        if self.slot_input != "none" and self.round_input != "none":
            raise ConfigError("a method has latent slots or rounds, not both")
        if self.router and self.slot_input != "hidden":
            raise ConfigError("a router chooses among latent-thought slots (slot_input='hidden')")
        if self.round_norm not in ("last", "every"):
            raise ConfigError(f"round_norm must be 'last' or 'every', got {self.round_norm!r}")


METHOD_SPECS: dict[str, MethodSpec] = {
    "vanilla": MethodSpec(),
    "pause": MethodSpec(slot_input="learned"),
    "loop": MethodSpec(round_input="residual", round_norm="last"),
    "ponderlm1": MethodSpec(round_input="soft_token", round_norm="every"),
    "ponderlm2": MethodSpec(slot_input="hidden"),
    "ponderlm3": MethodSpec(slot_input="hidden", router=True),
}
METHODS = tuple(METHOD_SPECS)
ROUTERS = ("linear", "mlp")
PENALTIES = ("expected_depth", "target_budget")
INITS = ("reference", "normal")
WARMUPS = ("staged", "zeros")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_finite_floats(obj: Any, prefix: str = "") -> None:
    """Every float field of a config dataclass must be a finite number: ``inf`` or ``nan`` in a
    learning rate or an epsilon would train a model of NaNs without a word."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{prefix}{f.name} must be a finite number, got {v}")


@dataclass
class ModelConfig:
    # --- backbone (Llama-style) ---
    vocab_size: int = 50304  # number of token ids the embedding and head cover
    d_model: int = 512  # residual stream width
    n_layers: int = 8  # transformer blocks
    n_heads: int = 8  # query heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None means n_heads
    d_ff: int = 1376  # SwiGLU hidden width
    max_seq_len: int = 1024  # longest token sequence (not slots): RoPE table size
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the output head
    init: str = "reference"  # "reference": trunc-normal std sqrt(2/(5d)), out-proj / sqrt(2L)
    init_std: float | None = None  # override the std of the "normal" init (default 0.02)
    scale_embeds: bool = True  # multiply token embeddings by sqrt(embed_scale_factor * d_model)
    embed_scale_factor: float = 2.5  # 2.5 gives unit-RMS embeddings under the reference init

    # --- method ---
    method: str = "ponderlm3"  # one of METHODS; what each is: METHOD_SPECS, docs/DESIGN.md section 1
    max_ponder_steps: int = 3  # K: extra slots (pause/ponderlm2/3) or extra passes (loop/ponderlm1)

    # --- Jacobi solver for the parallel (soft/hard) computation ---
    jacobi_iters: int = 3  # refinement passes at evaluation (J)
    jacobi_train_iters: tuple[int, ...] = (2, 3)  # J is drawn uniformly from these in training
    jacobi_warmup: str = "staged"  # "staged": K growing warm-up passes; "zeros": latents start at 0
    # training: backpropagate through the last n passes only (0 = all, as the PonderLM-2 reference
    # does); earlier passes run without autograd. Latent-thought methods only; forward unchanged.
    # Truncation is 1.9-2.2x faster per step, but n=1 cost PonderLM-2 0.26 nats on the quickstart
    # and leaves PonderLM-3 near depth 0 (docs/PERFORMANCE.md): an option, not the default.
    jacobi_grad_passes: int = 0

    # --- PonderLM-3 router ---
    router: str = "linear"  # "linear" or "mlp" (2 layers, SiLU)
    router_hidden: int = 0  # MLP hidden width; 0 means d_model // 4
    router_init_bias: float = 4.0  # logit bias on one depth at init (inferred): start near PonderLM-2
    router_init_depth: int | None = None  # the depth that gets the bias; None = K (full depth)

    # --- compute penalty (form inferred) ---
    penalty: str = "expected_depth"  # "expected_depth": lam*E[d]/K; "target_budget": lam*relu(E[d]-target)/K
    penalty_weight: float = 0.0  # lambda
    target_depth: float = 1.0  # budget (in steps) for the target_budget form

    # --- inference ---
    tau: float = 1e-4  # hard-pruning threshold on the reach probability w_{t,k}
    log_floor: float = -30.0  # log w is clamped here so no -inf/NaN enters attention
    renormalize_pruned: bool = False  # renormalise the mixture over kept steps after pruning

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, saved as-is

    def __post_init__(self) -> None:
        if isinstance(self.jacobi_train_iters, list):
            self.jacobi_train_iters = tuple(self.jacobi_train_iters)
        self.validate()

    # ---------------------------------------------------------------- derived
    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when unset."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # Capabilities of the method (see MethodSpec). K = max_ponder_steps is the one knob; it
    # becomes latent slots, rounds or depth depending on what the method is.
    @property
    def spec(self) -> MethodSpec:
        return METHOD_SPECS[self.method]

    @property
    def n_latent(self) -> int:
        """Latent slots interleaved after each token: K for slot methods, else 0."""
        return self.max_ponder_steps if self.spec.slot_input != "none" else 0

    @property
    def n_rounds(self) -> int:
        """Full passes of the stack over the length-T sequence: K+1 for round methods, else 1."""
        return self.max_ponder_steps + 1 if self.spec.round_input != "none" else 1

    @property
    def max_depth(self) -> int:
        """Extra computation steps a token can take (latent slots or extra rounds); depth
        histograms have max_depth+1 bins."""
        return max(self.n_latent, self.n_rounds - 1)

    @property
    def uses_jacobi(self) -> bool:
        """Whether the parallel computation only approximates the sequential one (latent feedback)."""
        return self.spec.slot_input == "hidden"

    @property
    def learned_slots(self) -> bool:
        """Whether latent slots take learned embeddings (pause tokens) rather than hidden states."""
        return self.spec.slot_input == "learned"

    @property
    def slots_per_token(self) -> int:
        return self.n_latent + 1

    @property
    def has_router(self) -> bool:
        return self.spec.router

    def round_ends_in_norm(self, last: bool) -> bool:
        """Whether a round's output goes through the final norm (always for the last round)."""
        return last or self.spec.round_norm == "every"

    @property
    def vocab_matmuls_per_token(self) -> int:
        """Vocabulary-sized matmuls per token: the LM head, plus for soft-token feedback the head
        after every inner round and the ``softmax(.) @ E`` that feeds it back."""
        return 2 * self.n_rounds - 1 if self.spec.round_input == "soft_token" else 1

    def pass_schedule(self, jacobi_iters: int) -> list[int]:
        """Slots per token computed by each pass of the parallel (soft/hard) computation: rounds
        run one slot per token each; latent thoughts run a staged warm-up (1..K slots, unless
        ``jacobi_warmup="zeros"``) then J refinements and a final pass over all K+1 slots; learned
        slots and vanilla are exact in one pass. The model runs exactly this; FLOPs count it."""
        if self.n_rounds > 1:
            return [1] * self.n_rounds
        K = self.n_latent
        if K == 0:
            return [1]
        if not self.uses_jacobi:
            return [K + 1]
        warm = list(range(1, K + 1)) if self.jacobi_warmup == "staged" else []
        return warm + [K + 1] * (jacobi_iters + 1)

    @property
    def max_jacobi_iters(self) -> int:
        """The most Jacobi refinements that can change anything: each pass makes at least one more
        slot of the longest dependency chain exact, and a sequence has max_seq_len x (K+1) slots."""
        return self.max_seq_len * self.slots_per_token

    @property
    def router_width(self) -> int:
        return self.router_hidden or max(1, self.d_model // 4)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.embed_scale_factor * self.d_model) if self.scale_embeds else 1.0

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field (every float must be finite)."""
        check_finite_floats(self)
        self._validate_backbone()
        self._validate_method()

    def _validate_backbone(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            v = getattr(self, name)
            _need(isinstance(v, int) and v >= 1, f"{name} must be a positive integer, got {v!r}")
        kv = self.n_kv_heads
        _need(kv is None or (isinstance(kv, int) and kv >= 1), f"n_kv_heads must be None or >= 1, got {kv!r}")
        _need(
            self.d_model % self.n_heads == 0, f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
        )
        _need(self.head_dim % 2 == 0, f"head_dim d_model/n_heads = {self.head_dim} must be even")
        _need(self.n_heads % self.kv_heads == 0,
              f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")  # fmt: skip
        _need(isinstance(self.max_seq_len, int) and self.max_seq_len >= 1,
              f"max_seq_len must be an integer >= 1, got {self.max_seq_len!r}")  # fmt: skip
        _need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        _need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        _need(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        _need(self.init_std is None or self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
        _need(self.embed_scale_factor > 0, "embed_scale_factor must be > 0")

    def _validate_method(self) -> None:
        K = self.max_ponder_steps
        _need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        _need(isinstance(K, int) and K >= 0, f"max_ponder_steps must be an integer >= 0, got {K!r}")
        if self.spec.slot_input != "none" or self.spec.round_input != "none":
            _need(K >= 1, f"method={self.method} needs max_ponder_steps (K) >= 1, got {K}")
        _need(self.jacobi_iters >= 1, f"jacobi_iters must be >= 1, got {self.jacobi_iters}")
        Js = self.jacobi_train_iters
        _need(len(Js) > 0 and all(j >= 1 for j in Js),
              f"jacobi_train_iters must be a non-empty list of integers >= 1, got {Js}")  # fmt: skip
        _need(self.jacobi_warmup in WARMUPS, f"jacobi_warmup must be one of {WARMUPS}")
        if self.uses_jacobi:  # huge J once built a list of a pass per refinement, and ran for ever
            cap = self.max_jacobi_iters
            _need(max(self.jacobi_iters, *Js) <= cap,
                  f"jacobi_iters and jacobi_train_iters must be at most max_seq_len x (K+1) = {cap} (the passes "
                  f"reach the recurrence exactly within one per slot of a sequence), got "
                  f"{max(self.jacobi_iters, *Js)}")  # fmt: skip
        _need(isinstance(self.jacobi_grad_passes, int) and self.jacobi_grad_passes >= 0,
              f"jacobi_grad_passes must be an integer >= 0 (0 = all), got {self.jacobi_grad_passes!r}")  # fmt: skip
        _need(self.router in ROUTERS, f"router must be one of {ROUTERS}, got {self.router!r}")
        _need(self.router_hidden >= 0, "router_hidden must be >= 0")
        rid = self.router_init_depth
        _need(rid is None or (isinstance(rid, int) and 0 <= rid <= K),
              f"router_init_depth must be None or in [0, K={K}], got {rid!r}")  # fmt: skip
        _need(self.penalty in PENALTIES, f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        _need(self.penalty_weight >= 0, f"penalty_weight must be >= 0, got {self.penalty_weight}")
        _need(self.target_depth >= 0, f"target_depth must be >= 0, got {self.target_depth}")
        check_tau(self.tau)
        _need(self.log_floor < 0, "log_floor must be finite and < 0")

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["jacobi_train_iters"] = list(self.jacobi_train_iters)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write the config as JSON atomically (temp file, then rename)."""
        _atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """A saved config; a file beyond limits.MAX_METADATA_BYTES is refused unread (InputTooLarge),
        JSON that is not a mapping of fields is a ConfigError."""
        from .limits import read_json_limited

        d = read_json_limited(path, "model_config.json")
        if not isinstance(d, dict):
            raise ConfigError(f"expected a mapping of ModelConfig fields, got {type(d).__name__}")
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def check_tau(tau: float) -> float:
    if not (isinstance(tau, (int, float)) and 0.0 < tau < 1.0):
        raise ConfigError(f"tau must be in the open interval (0, 1), got {tau!r}")
    return float(tau)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
    from .limits import MAX_METADATA_BYTES, InputTooLarge, read_limited

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

    _atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))

"""Typed model configuration, validated on construction and saved next to every checkpoint.

Where a field is marked *(inferred)* the PonderLM-3 paper does not pin the choice down; the
default is our reading (see ``docs/DESIGN.md``, "Inferred choices").
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ponderlm.errors import ConfigError

SLOT_INPUTS = ("none", "learned", "hidden")
ROUND_INPUTS = ("none", "residual", "soft_token")


@dataclass(frozen=True)
class MethodSpec:
    """What a method *is*, in the terms the rest of the code asks about. No module outside this
    one compares method names: the model, the FLOPs counter, decoding and the trainer ask these
    capabilities (through :class:`ModelConfig`), so a new method is a row of METHOD_SPECS plus
    its tests (docs/DESIGN.md, "Adding a method")."""

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
        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """A saved config; a file beyond limits.MAX_METADATA_BYTES is refused unread (InputTooLarge),
        JSON that is not a mapping of fields is a ConfigError."""
        from ponderlm.limits import read_json_limited

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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)

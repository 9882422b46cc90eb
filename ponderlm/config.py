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

METHODS = ("vanilla", "ponderlm2", "ponderlm3")
PONDER_METHODS = ("ponderlm2", "ponderlm3")
ROUTERS = ("linear", "mlp")
PENALTIES = ("expected_depth", "target_budget")
INITS = ("reference", "normal")
WARMUPS = ("staged", "zeros")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


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
    method: str = "ponderlm3"  # one of METHODS
    max_ponder_steps: int = 3  # K: latent thought slots per token (0 for vanilla)

    # --- Jacobi solver for the parallel (soft/hard) computation ---
    jacobi_iters: int = 3  # refinement passes at evaluation (J)
    jacobi_train_iters: tuple[int, ...] = (2, 3)  # J is drawn uniformly from these in training
    jacobi_warmup: str = "staged"  # "staged": K growing warm-up passes; "zeros": latents start at 0

    # --- PonderLM-3 router ---
    router: str = "linear"  # "linear" or "mlp" (2 layers, SiLU)
    router_hidden: int = 0  # MLP hidden width; 0 means d_model // 4
    router_init_bias: float = 4.0  # logit bias on depth K at init (inferred): start near PonderLM-2

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
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.validate()

    # ---------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_latent(self) -> int:
        """Latent slots per token actually used by the method (0 for vanilla)."""
        return self.max_ponder_steps if self.method in PONDER_METHODS else 0

    @property
    def slots_per_token(self) -> int:
        return self.n_latent + 1

    @property
    def has_router(self) -> bool:
        return self.method == "ponderlm3"

    @property
    def router_width(self) -> int:
        return self.router_hidden or max(1, self.d_model // 4)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.embed_scale_factor * self.d_model) if self.scale_embeds else 1.0

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be a positive integer, got {v!r}")
        need(
            self.d_model % self.n_heads == 0,
            f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})",
        )
        need(self.head_dim % 2 == 0, f"head_dim d_model/n_heads = {self.head_dim} must be even")
        need(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})",
        )
        need(self.max_seq_len >= 1, f"max_seq_len must be >= 1, got {self.max_seq_len}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        need(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        need(self.init_std is None or self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
        need(self.embed_scale_factor > 0, "embed_scale_factor must be > 0")
        need(
            isinstance(self.max_ponder_steps, int) and self.max_ponder_steps >= 0,
            f"max_ponder_steps must be an integer >= 0, got {self.max_ponder_steps!r}",
        )
        if self.method in PONDER_METHODS:
            need(
                self.max_ponder_steps >= 1,
                f"method={self.method} needs max_ponder_steps (K) >= 1, got {self.max_ponder_steps}",
            )
        need(self.jacobi_iters >= 1, f"jacobi_iters must be >= 1, got {self.jacobi_iters}")
        need(
            len(self.jacobi_train_iters) > 0 and all(j >= 1 for j in self.jacobi_train_iters),
            f"jacobi_train_iters must be a non-empty list of integers >= 1, got {self.jacobi_train_iters}",
        )
        need(self.jacobi_warmup in WARMUPS, f"jacobi_warmup must be one of {WARMUPS}")
        need(self.router in ROUTERS, f"router must be one of {ROUTERS}, got {self.router!r}")
        need(self.router_hidden >= 0, "router_hidden must be >= 0")
        need(self.penalty in PENALTIES, f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        need(self.penalty_weight >= 0, f"penalty_weight must be >= 0, got {self.penalty_weight}")
        need(self.target_depth >= 0, f"target_depth must be >= 0, got {self.target_depth}")
        check_tau(self.tau)
        need(self.log_floor < 0 and math.isfinite(self.log_floor), "log_floor must be finite and < 0")

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
        return cls.from_json(Path(path).read_text())

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

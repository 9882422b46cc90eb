"""How much memory a model config needs, from the config alone, and the refusal when it does not fit.

A config whose weights (or, in training, weights, gradients, AdamW state and one micro-batch's
activations) need more memory than this machine or device has available is refused *before*
anything is allocated, naming the config keys (:func:`check_model_fits`,
:func:`check_training_fits`). The estimates are lower bounds, so a refusal is never a guess."""

from __future__ import annotations

import math
from typing import Any

from ponderlm.errors import InputTooLarge
from ponderlm.limits import available_memory, human_bytes
from ponderlm.model.config import ModelConfig


def parameter_count(cfg: ModelConfig) -> int:
    """The number of parameters of ``PonderLM(cfg)``, from the config alone (nothing is built):
    embedding, head (unless tied), per block q/k/v/o, SwiGLU and two norms, the final norm, a
    router and pause embeddings. ``tests/test_limits.py`` checks it equals the built model's."""
    D, V, L, hd = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.head_dim
    attn = D * cfg.n_heads * hd * 2 + D * cfg.kv_heads * hd * 2
    block = attn + 3 * D * cfg.d_ff + 2 * D
    n = V * D * (1 if cfg.tie_embeddings else 2) + L * block + D
    if cfg.has_router:
        S = cfg.max_ponder_steps + 1
        if cfg.router == "mlp":
            n += D * cfg.router_width + cfg.router_width + cfg.router_width * S + S
        else:
            n += D * S + S
    if cfg.learned_slots:
        n += cfg.max_ponder_steps * D
    return n


def model_bytes(cfg: ModelConfig) -> int:
    """A lower bound of the memory a PonderLM of ``cfg`` takes: fp32 weights plus the float64 RoPE
    tables (cos and sin, max_seq_len x head_dim each) it builds on first use."""
    return 4 * parameter_count(cfg) + 16 * cfg.max_seq_len * cfg.head_dim


SIZE_KEYS = ("vocab_size", "d_model", "n_layers", "d_ff", "max_seq_len", "max_ponder_steps")


def _keys(cfg: ModelConfig, prefix: str) -> str:
    return ", ".join(f"{prefix}{k}={getattr(cfg, k)}" for k in SIZE_KEYS)


def check_model_fits(cfg: ModelConfig, what: str, prefix: str = "model.", device: Any = "cpu") -> None:
    """Refuse (InputTooLarge) a model config whose weights alone need more memory than ``device``
    has available, before anything is allocated. ``what`` says whose config it is."""
    need = model_bytes(cfg)
    room = available_memory(device)
    if room is not None and need > room[0]:
        raise InputTooLarge(
            f"{what} needs at least {human_bytes(need)} of memory for its weights "
            f"({parameter_count(cfg):,} parameters; {_keys(cfg, prefix)}), more than the "
            f"{human_bytes(room[0])} {room[1]}"
        )


def training_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, world: int, act_bytes: int) -> dict[str, int]:
    """Lower bounds of what one training process holds: the model (:func:`model_bytes`); gradients
    and AdamW's two moments (fp32, 12 bytes a parameter, sharded over ``world`` processes at best);
    and the activations backward needs of one micro-batch: the logits, and in every block, for every
    slot of every pass backward goes through, the block's input, the attention's output and the
    SwiGLU's gate and up projections (far from all it keeps: a lower bound)."""
    params = parameter_count(cfg)
    schedule = cfg.pass_schedule(min(cfg.jacobi_train_iters))  # slots per token of each pass
    n = cfg.jacobi_grad_passes if cfg.uses_jacobi else 0
    slots = sum(schedule[-n:] if n else schedule)
    per_slot = cfg.n_layers * (2 * cfg.d_model + 2 * cfg.d_ff)
    acts = micro_batch * seq_len * (cfg.vocab_size + slots * per_slot) * act_bytes
    return {"model": model_bytes(cfg), "optimizer": math.ceil(12 * params / max(world, 1)), "activations": acts}


def check_training_fits(cfg: ModelConfig, micro_batch: int, seq_len: int, world: int, device: Any,
                        act_bytes: int) -> None:  # fmt: skip
    """Refuse (InputTooLarge) a training config that cannot fit in ``device``'s available memory,
    naming the keys that decide it, before the model or a batch is allocated."""
    parts = training_bytes(cfg, micro_batch, seq_len, world, act_bytes)
    need = sum(parts.values())
    room = available_memory(device)
    if room is None or need <= room[0]:
        return
    raise InputTooLarge(
        f"training this config needs at least {human_bytes(need)} of memory (weights {human_bytes(parts['model'])}, "
        f"gradients and AdamW state {human_bytes(parts['optimizer'])}, activations of a micro-batch of "
        f"{micro_batch} x {seq_len} tokens {human_bytes(parts['activations'])}; {_keys(cfg, 'model.')}, "
        f"train.batch_size, train.micro_batch_size, train.seq_len), more than the {human_bytes(room[0])} "
        f"{room[1]}; choose smaller sizes"
    )

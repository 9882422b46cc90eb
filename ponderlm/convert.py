"""``ponderlm convert --from-hf``: a transformers Llama-architecture model (a checkpoint directory
or a GGUF file, read through transformers) -> a ponderlm ``vanilla`` run directory with the same
logits, ready for ``ponderlm train --init-from`` (continued pretraining as PonderLM-2/3).

The parameter names of ponderlm's blocks are transformers' Llama names, so conversion is a rename
(``model.`` prefix dropped) after checking that the architecture is one ponderlm computes exactly:
RMSNorm, rotate-half RoPE without scaling, SwiGLU with SiLU, no biases, head_dim = d/heads.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .checkpoint import CheckpointError, save_checkpoint
from .config import ModelConfig, RunConfig, TrainConfig
from .data import DataError


def _rope_theta(hf_cfg) -> float:
    rp = getattr(hf_cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        kind = rp.get("rope_type", "default")
        if kind != "default":
            raise DataError(f"RoPE scaling {kind!r} is not supported (ponderlm computes plain RoPE)")
        return float(rp.get("rope_theta", 10000.0))
    scaling = getattr(hf_cfg, "rope_scaling", None)
    if scaling:
        raise DataError(f"RoPE scaling {scaling!r} is not supported (ponderlm computes plain RoPE)")
    return float(getattr(hf_cfg, "rope_theta", 10000.0))


def llama_model_config(hf_cfg, max_seq_len: int | None = None) -> ModelConfig:
    """The ponderlm ``vanilla`` config that computes what a transformers Llama config describes."""
    if getattr(hf_cfg, "model_type", None) != "llama":
        raise DataError(f"only Llama-architecture models convert, got model_type={hf_cfg.model_type!r}")
    act = getattr(hf_cfg, "hidden_act", "silu")
    if act != "silu":
        raise DataError(f"hidden_act {act!r} is not supported (SwiGLU with SiLU only)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_cfg, flag, False):
            raise DataError(f"{flag}=True is not supported (ponderlm's projections have no bias)")
    d, h = hf_cfg.hidden_size, hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or d // h
    if head_dim * h != d:
        raise DataError(f"head_dim {head_dim} x heads {h} != hidden_size {d}: not supported")
    return ModelConfig(
        vocab_size=hf_cfg.vocab_size,
        d_model=d,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=h,
        n_kv_heads=getattr(hf_cfg, "num_key_value_heads", None) or h,
        d_ff=hf_cfg.intermediate_size,
        max_seq_len=min(max_seq_len or hf_cfg.max_position_embeddings, hf_cfg.max_position_embeddings),
        rope_theta=_rope_theta(hf_cfg),
        norm_eps=hf_cfg.rms_norm_eps,
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
        scale_embeds=False,  # Llama feeds raw embeddings
        method="vanilla",
    )


def llama_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers Llama parameter names -> ponderlm names (drop the ``model.`` prefix)."""
    out = {}
    for k, v in hf_state.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        out[k.removeprefix("model.")] = v
    return out


def load_hf_llama(src: Path, gguf_file: str | None = None):
    """(transformers model in float32, its tokenizer or None) from a directory or a .gguf file."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise DataError("converting needs transformers: pip install 'ponderlm[hf]'") from None
    src = Path(src)
    if src.is_file() and src.suffix == ".gguf":
        src, gguf_file = src.parent, src.name
    if not src.is_dir():
        raise DataError(f"--from-hf {src}: no such directory or .gguf file")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file and not (src / gguf_file).is_file():
        raise DataError(f"{src / gguf_file}: no such GGUF file")
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
    except ImportError as e:
        raise DataError(f"cannot read {src}: {e}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read a transformers model from {src}: {str(e).splitlines()[0]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
    except (OSError, ValueError):
        tok = None
    return model, tok


def convert_from_hf(
    src: str | Path,
    out: str | Path,
    *,
    gguf_file: str | None = None,
    max_seq_len: int | None = None,
    overwrite: bool = False,
    log=print,
) -> Path:
    """Convert and write a ponderlm run directory (checkpoint at step 0 + tokenizer.json)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    hf_model, hf_tok = load_hf_llama(Path(src), gguf_file)
    cfg = llama_model_config(hf_model.config, max_seq_len)
    state = llama_state_dict(hf_model.state_dict())
    from .model import PonderLM

    model = PonderLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(
            f"{src}: weights do not fit a Llama layout: missing {missing[:4]}, extra {unexpected[:4]}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok_file = None
        if hf_tok is not None and getattr(hf_tok, "backend_tokenizer", None) is not None:
            tok_file = tmp / "source_tokenizer.json"
            from .data.tokenizer import Tokenizer

            hf_tok.backend_tokenizer.save(str(tok_file))
            Tokenizer.load(tok_file)  # checks it is usable (has an end-of-text token)
            tok_file = tok_file.rename(tmp / "tokenizer.json")
        else:
            log("note: no fast tokenizer found next to the model; the checkpoint has no tokenizer.json")
        run_cfg = RunConfig(model=cfg, train=TrainConfig(out_dir=str(out)))
        trainer_state = {"step": 0, "tokens_seen": 0, "converted_from": str(Path(src).resolve())}
        save_checkpoint(tmp, 0, model.state_dict(), None, trainer_state, run_cfg, tok_file, keep_last=1)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(p.numel() for p in model.parameters())
    log(f"converted {src} -> {out} (vanilla, {n:,} parameters, {cfg.n_layers} layers, d={cfg.d_model})")
    return out

"""``ponderlm convert --from-hf``: a transformers Llama-architecture model (a checkpoint directory
or a GGUF file, read through transformers) -> a ponderlm ``vanilla`` run directory with the same
logits, ready for ``ponderlm train --init-from`` (continued pretraining as PonderLM-2/3).

The parameter names of ponderlm's blocks are transformers' Llama names, so conversion is a rename
(``model.`` prefix dropped) after checking that the architecture is one ponderlm computes exactly:
RMSNorm, rotate-half RoPE without scaling, SwiGLU with SiLU, no biases, head_dim = d/heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ponderlm import owned
from ponderlm.errors import CheckpointError, ConfigError, DataError
from ponderlm.hf.load import first_line, quiet_transformers
from ponderlm.model.config import ModelConfig
from ponderlm.runs.checkpoint import save_checkpoint
from ponderlm.runs.config import RunConfig, TrainConfig
from ponderlm.runs.directory import RUN


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


def _check_max_seq_len(max_seq_len: int | None) -> None:
    if max_seq_len is not None and (type(max_seq_len) is not int or max_seq_len < 1):
        raise ConfigError(f"--max-seq-len must be an integer >= 1, got {max_seq_len!r}")


def llama_model_config(hf_cfg, max_seq_len: int | None = None) -> ModelConfig:
    """The ponderlm ``vanilla`` config that computes what a transformers Llama config describes."""
    _check_max_seq_len(max_seq_len)
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


def _check_model_dir(src: Path) -> None:
    """The two ways a model directory is most often broken, named plainly (not in transformers' words)."""
    cfg = src / "config.json"
    if not cfg.is_file():
        raise DataError(f"--from-hf {src}: no config.json (not a transformers model directory)")
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{cfg} is not JSON ({first_line(e)})") from None
    if not any(p.suffix in (".safetensors", ".bin", ".gguf") for p in src.iterdir()):
        raise DataError(f"no weights (*.safetensors, *.bin or a .gguf file) in {src}")


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
    if not gguf_file:
        _check_model_dir(src)
    try:
        with quiet_transformers():  # its load report and progress bar would break the one-line error
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
    except ImportError as e:
        raise DataError(f"cannot read {src}: {first_line(e)}") from None
    except Exception as e:  # transformers, safetensors and gguf each raise their own types for unreadable files
        what = src / gguf_file if gguf_file else src
        why = first_line(e)
        if "mismatched_sizes" in why:
            why = "its weights have other shapes than its config.json describes"
        raise DataError(f"cannot read a transformers model from {what}: {why}") from None
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(src, **kw)
    except Exception:  # no usable tokenizer next to the weights: the run is written without one
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
    """Convert and write a ponderlm run directory (checkpoint at step 0 + tokenizer.json).

    ``out`` is built aside and renamed into place under its lock (:mod:`ponderlm.owned`): an
    earlier converted run is replaced only with ``overwrite``; an output that is, contains or lies
    inside the source, or a directory ponderlm did not make, is refused and never deleted."""
    out, src = Path(out), Path(src)
    _check_max_seq_len(max_seq_len)
    sources = [src] + ([src / gguf_file] if gguf_file else [])
    owned.check_disjoint(out, sources, "--out")
    with owned.DirLock(out, "--out"):
        owned.check_replaceable(out, RUN, overwrite=overwrite, choose="--out",
                                exists_hint="pass --overwrite to replace it or choose another --out")  # fmt: skip
        hf_model, hf_tok = load_hf_llama(src, gguf_file)
        cfg = llama_model_config(hf_model.config, max_seq_len)
        model = _ponderlm_model(src, cfg, llama_state_dict(hf_model.state_dict()))
        with owned.building(out, RUN) as tmp:
            _write_run(tmp, out, src, model, hf_tok, log)
    n = sum(p.numel() for p in model.parameters())
    log(f"converted {src} -> {out} (vanilla, {n:,} parameters, {cfg.n_layers} layers, d={cfg.d_model})")
    return out


def _ponderlm_model(src: Path, cfg: ModelConfig, state: dict[str, torch.Tensor]):
    """The ponderlm model of ``cfg`` holding the converted weights, all of them and nothing else."""
    from ponderlm.model.model import PonderLM

    model = PonderLM(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of the wrong shape for the config next to them
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{src}: weights do not fit its config ({first[-1].strip()[:200]})") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(
            f"{src}: weights do not fit a Llama layout: missing {missing[:4]}, extra {unexpected[:4]}"
        )
    return model


def hf_tokenizer_config(hf_tok) -> dict:
    """The chat template and special tokens of a transformers tokenizer, as ``tokenizer_config.json``
    keeps them (:func:`ponderlm.data.tokenizer.read_tokenizer_config`): what a GGUF file's
    ``tokenizer.chat_template`` and ``tokenizer.ggml.*_token_id`` become in transformers, or a model
    directory's ``tokenizer_config.json`` / ``chat_template.jinja``."""
    from ponderlm.data.tokenizer import SPECIAL_TOKENS

    out = {k: v for k in SPECIAL_TOKENS if isinstance(v := getattr(hf_tok, k, None), str)}
    template = getattr(hf_tok, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one, as transformers picks
        template = template.get("default")
    if isinstance(template, str):
        out["chat_template"] = template
    return out


def _write_run(tmp: Path, out: Path, src: Path, model, hf_tok, log) -> None:
    """The run directory's content, into ``tmp``: a step-0 checkpoint with the source's fast
    tokenizer (when it has one), its chat template and special tokens (``tokenizer_config.json``,
    when it has them) and a config whose train.out_dir is ``out``."""
    tok_file = cfg_file = None
    if hf_tok is not None and getattr(hf_tok, "backend_tokenizer", None) is not None:
        tok_file = tmp / ".tokenizer.json.tmp"  # copied into the checkpoint, then removed
        from ponderlm.data.tokenizer import Tokenizer

        hf_tok.backend_tokenizer.save(str(tok_file))
        tok = Tokenizer.load(tok_file)  # checks it is usable (has an end-of-text token)
        try:
            tok.apply_config(hf_tokenizer_config(hf_tok))
        except DataError as e:
            raise DataError(f"{src}: {e}") from None
        cfg_file = tmp / ".tokenizer_config.json.tmp"
        if not tok.save_config(cfg_file):
            cfg_file = None
        if tok.chat_template is not None:
            log(f"chat template kept; generation stops at {tok.eos_token!r} (id {tok.eos_id})")
    else:
        log("note: no fast tokenizer found next to the model; the checkpoint has no tokenizer.json")
    run_cfg = RunConfig(model=model.cfg, train=TrainConfig(out_dir=str(out)))
    trainer_state = {"step": 0, "tokens_seen": 0, "converted_from": str(src.resolve())}
    save_checkpoint(tmp, 0, model.state_dict(), None, trainer_state, run_cfg, tok_file, keep_last=1,
                    tokenizer_config=cfg_file)  # fmt: skip
    for f in (tok_file, cfg_file):
        if f is not None:
            f.unlink()

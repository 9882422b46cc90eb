"""``ponderlm export``: a trainer checkpoint (or run) written as a transformers model directory
with a model card (README.md, :mod:`ponderlm.hf.card`). By default it carries no code and
``AutoModelForCausalLM.from_pretrained`` loads it wherever ponderlm is installed (the classes are
in :mod:`ponderlm.hf.modeling`, registered by :mod:`ponderlm._autoregister`); with
``self_contained`` it also carries the modeling code gathered from the package
(:mod:`ponderlm.hf.gather`) and loads with ``trust_remote_code=True`` where ponderlm is not."""

from __future__ import annotations

from pathlib import Path

from ponderlm import owned
from ponderlm.hf import gather
from ponderlm.hf.card import model_card, run_facts
from ponderlm.hf.load import quiet_transformers
from ponderlm.loading import load_model
from ponderlm.model.config import check_tau


def _export_before_markers(directory: Path) -> bool:
    cfg = owned.read_small_json(directory / "config.json")
    return isinstance(cfg, dict) and cfg.get("model_type") == "ponderlm"


# what an export holds: the transformers files ponderlm writes, and `ponderlm eval/analyze EXPORT`'s
# default outputs inside it; a self-contained export's modeling code is ponderlm_*.py
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "README.md",
                          "eval", "analysis"})  # fmt: skip
EXPORT = owned.DirKind("export", "a transformers export", EXPORT_FILES, pattern=gather.PATTERN,
                       legacy=_export_before_markers)  # fmt: skip


def hf_tokenizer(tok):
    """A ``PreTrainedTokenizerFast`` over ponderlm's tokenizer: the model's own special tokens and
    chat template when it has them (a converted model), else end-of-text as bos, eos and pad."""
    from transformers import PreTrainedTokenizerFast

    eot = tok.tk.id_to_token(tok.eot_id)
    special = {"bos_token": eot, "pad_token": eot, **tok.special_tokens, "eos_token": tok.eos_token}
    extra = {"chat_template": tok.chat_template} if tok.chat_template is not None else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok.tk, **special, **extra)


def export(checkpoint, out, *, overwrite: bool = False, tau: float | None = None, self_contained: bool = False,
           log=print):  # fmt: skip
    """Write a trainer checkpoint (or run) as a transformers directory: safetensors weights,
    config.json, generation_config.json (eos: the model's end of turn), tokenizer files (with the
    model's chat template, when it has one), a model card (README.md) and, with
    ``self_contained``, the modeling code (``ponderlm_*.py``, config.json's ``auto_map``), gathered
    before anything is written. ``out`` is a ponderlm ``export``
    directory, built aside and renamed into place (:func:`ponderlm.owned.building`) under its
    lock; an earlier export is replaced only with ``overwrite``, anything else in the way (the
    checkpoint itself, a directory of the user's files) is refused, never deleted."""
    from ponderlm.hf.modeling import PonderLMForCausalLM  # transformers: imported only when exporting

    out = Path(out)
    if tau is not None:
        check_tau(tau)
    owned.check_disjoint(out, [Path(checkpoint)], "output directory")
    code = gather.gather() if self_contained else {}  # refuses modeling code that needs more than torch/transformers
    with owned.DirLock(out, "output directory"):
        hint = "pass --overwrite to replace it or choose another output directory"
        owned.check_replaceable(out, EXPORT, overwrite=overwrite, exists_hint=hint, choose="output directory")
        model, tok, src = load_model(checkpoint)
        owned.check_disjoint(out, [src], "output directory")  # the checkpoint a run directory resolved to
        wrapper = PonderLMForCausalLM.from_ponderlm(model, tau=tau)
        hf_tok = hf_tokenizer(tok)
        wrapper.generation_config.eos_token_id = tok.eos_id  # `generate` stops at the model's end of turn
        wrapper.generation_config.pad_token_id = hf_tok.pad_token_id
        if code:
            wrapper.config.auto_map = gather.auto_map()
        n_params = sum(p.numel() for p in model.parameters())
        card = model_card(model.cfg, wrapper.config.tau, n_params, run_facts(Path(src)), self_contained=bool(code),
                          name=out.resolve().name)  # fmt: skip
        with owned.building(out, EXPORT) as tmp, quiet_transformers():
            wrapper.save_pretrained(tmp)
            hf_tok.save_pretrained(tmp)
            for name, text in code.items():
                (tmp / name).write_text(text, encoding="utf-8")
            (tmp / "README.md").write_text(card, encoding="utf-8")
            owned.as_umask_allows(tmp)  # model.safetensors comes out 0600
    how = ", self-contained" if code else ""
    log(f"exported {src} ({model.cfg.method}, tau {wrapper.config.tau:g}{how}) to {out}")
    return out

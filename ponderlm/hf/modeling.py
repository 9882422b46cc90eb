"""transformers integration: ``PonderLMConfig`` and ``PonderLMForCausalLM``.

After ``import ponderlm`` (in either order with ``import transformers``) the classes are
registered with ``AutoConfig`` / ``AutoModelForCausalLM``, so a directory written by
``save_pretrained`` or ``ponderlm export`` loads with ``AutoModelForCausalLM.from_pretrained(dir)``
and no ``trust_remote_code``. The wrapper holds a :class:`ponderlm.PonderLM` as ``.model``; its
forward is the hard-pruned inference computation and ``generate`` decodes through ponderlm's own
KV cache, which holds only the slots that were computed.

Inference knobs live in the config (``tau``, ``prefill``, ``jacobi_iters``) and can be overridden
per call: ``model.generate(ids, tau=0.05)`` or ``model(ids, tau=0.05)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ponderlm.model import recurrence
from ponderlm.model.cache import KVCache, RoundCaches
from ponderlm.model.config import ModelConfig, check_tau
from ponderlm.model.model import PonderLM

MODEL_TYPE = "ponderlm"


class PonderLMConfig(PretrainedConfig):
    """A transformers config that carries a :class:`ponderlm.ModelConfig` under ``ponder``."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        ponder: dict[str, Any] | None = None,
        tau: float | None = None,
        prefill: str = "auto",
        jacobi_iters: int | None = None,
        **kwargs,
    ) -> None:
        self.ponder = dict(ponder) if ponder else ModelConfig().to_dict()
        mc = ModelConfig.from_dict(self.ponder)  # validates
        self.tau = check_tau(mc.tau if tau is None else tau)
        if prefill not in ("auto", "exact", "parallel", "converged"):
            raise ValueError(f"prefill must be 'auto', 'exact', 'parallel' or 'converged', got {prefill!r}")
        self.prefill = prefill
        self.jacobi_iters = jacobi_iters
        # the names generic transformers code looks for
        self.vocab_size = mc.vocab_size
        self.hidden_size = mc.d_model
        self.num_hidden_layers = mc.n_layers
        self.num_attention_heads = mc.n_heads
        self.max_position_embeddings = mc.max_seq_len
        kwargs.setdefault("tie_word_embeddings", mc.tie_embeddings)
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.ponder)


# transformers 5.24 renamed the cache of model outputs and generation from ``past_key_values`` to
# ``cache``; the model reads both and returns and asks for whichever this transformers uses
CACHE = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


@dataclass
class PonderCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the realised ponder depth of every input position (B, T)."""

    depth: Tensor | None = None


class PonderLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PonderLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["Block"]

    def __init__(self, config: PonderLMConfig) -> None:
        super().__init__(config)
        self.model = PonderLM(config.model_config())
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()

    @classmethod
    def from_ponderlm(cls, model: PonderLM, **config_kwargs) -> PonderLMForCausalLM:
        """Wrap a trained PonderLM (weights shared, not copied)."""
        cfg = PonderLMConfig(ponder=model.cfg.to_dict(), **config_kwargs)
        wrapper = cls(cfg)
        wrapper.model = model
        return wrapper.to(next(model.parameters()).dtype)

    def _init_weights(self, module) -> None:  # PonderLM initialises itself; loading fills the rest
        pass

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # ponderlm's own cache: variable slots per token and per row

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | RoundCaches | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        tau: float | None = None,
        return_dict: bool | None = None,
        past_key_values: KVCache | RoundCaches | None = None,
        **kwargs,
    ) -> PonderCausalLMOutput:
        """Logits of the inference computation (hard pruning at ``tau``).

        Without ``cache``: the whole (left-padded) batch; with ``use_cache`` the prompt runs
        through the recurrence (``prefill``) and the filled cache is returned. With ``cache``:
        ``input_ids`` are new tokens appended to it, ``attention_mask`` covers all tokens so far.
        ``position_ids`` are ignored: positions follow from the attention mask. ``past_key_values``
        is ``cache`` under its name before transformers 5.24.
        """
        if input_ids is None:
            raise ValueError("PonderLMForCausalLM needs input_ids (inputs_embeds are not supported)")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds are not supported; pass input_ids")
        cfg = self.config
        tau = check_tau(cfg.tau if tau is None else tau)
        if use_cache is None:  # transformers 5 configs no longer carry use_cache: no cache unless asked
            use_cache = bool(getattr(cfg, "use_cache", False))
        mask = attention_mask.bool() if attention_mask is not None else None
        m = self.model
        cache = past_key_values if cache is None else cache
        if cache is None:
            # the prompt through the model's prefill (the computation generate runs, with or without
            # a cache to return); the cache tracks each row's next position
            capacity = (2 if use_cache else 1) * input_ids.shape[1] * m.cfg.slots_per_token
            out, cache = recurrence.prefill(m, input_ids, tau=tau, attention_mask=mask, how=cfg.prefill,
                                            jacobi_iters=cfg.jacobi_iters, capacity=capacity)  # fmt: skip
        else:  # new tokens appended to the cache; the mask covers all tokens so far
            if getattr(cache, "next_pos", None) is None:
                raise ValueError("this cache was not filled by PonderLMForCausalLM (no next_pos)")
            L = input_ids.shape[1]
            out = recurrence.extend(
                m, input_ids, cache, tau=tau, attention_mask=mask[:, -L:] if mask is not None else None
            )
        logits, depth = out.logits, out.depth
        loss = None
        if labels is not None:
            shift = labels[:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), shift, ignore_index=-100
            )
        return PonderCausalLMOutput(loss=loss, logits=logits, depth=depth, **{CACHE: cache if use_cache else None})

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, past_key_values=None,
                                      **kwargs):  # fmt: skip
        cache = past_key_values if cache is None else cache
        if cache is not None:
            input_ids = input_ids[:, -1:]  # one new token per step
        out = {"input_ids": input_ids, "attention_mask": attention_mask, CACHE: cache}
        for k in ("tau", "use_cache"):
            if k in kwargs:
                out[k] = kwargs[k]
        return out


_registered = False


def register() -> None:
    """Register the classes with transformers' Auto* factories (idempotent). Done on import of the
    installed package's module only: as a self-contained export's remote code (a copy of this
    module, see :mod:`ponderlm.hf.gather`) transformers registers the classes it loads itself, and
    the copy must not take the model type over from an installed ponderlm."""
    global _registered
    if _registered:
        return
    AutoConfig.register(MODEL_TYPE, PonderLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(PonderLMConfig, PonderLMForCausalLM, exist_ok=True)
    _registered = True


if __name__ == "ponderlm.hf.modeling":
    register()

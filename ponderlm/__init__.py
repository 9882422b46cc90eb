"""ponderlm: pretraining, evaluation and serving of language models with token-wise adaptive
pondering (PonderLM-3), its PonderLM-2 backbone and baselines, in one model code path."""

from ._hf_hook import install as _install_hf_hook
from ._version import __version__
from .config import ConfigError, ModelConfig
from .generate import GenerateOutput, generate
from .losses import ponder_loss
from .model import PonderLM, PonderOutput

_install_hf_hook()  # AutoModelForCausalLM knows "ponderlm" once transformers is imported

__all__ = [
    "ConfigError",
    "GenerateOutput",
    "ModelConfig",
    "PonderLM",
    "PonderOutput",
    "__version__",
    "generate",
    "ponder_loss",
]

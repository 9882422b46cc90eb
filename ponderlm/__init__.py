"""ponderlm: pretraining, evaluation and serving of language models with token-wise adaptive
pondering (PonderLM-3), its PonderLM-2 backbone and baselines, in one model code path."""

from .config import ConfigError, ModelConfig
from .generate import GenerateOutput, generate
from .losses import ponder_loss
from .model import PonderLM, PonderOutput

__all__ = [
    "ConfigError",
    "GenerateOutput",
    "ModelConfig",
    "PonderLM",
    "PonderOutput",
    "generate",
    "ponder_loss",
]
__version__ = "0.1.0"

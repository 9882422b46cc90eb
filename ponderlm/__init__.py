"""ponderlm: pretraining, evaluation and serving of language models with token-wise adaptive
pondering (PonderLM-3), its PonderLM-2 backbone and baselines, in one model code path."""

import os

from ponderlm._version import __version__

# The tokenizing workers of `data prepare` (ponderlm.data.encode sets this for them) import only what
# tokenizing needs: not the model, not torch (seconds and a few hundred MB per worker).
if not os.environ.get("PONDERLM_TOKENIZER_WORKER"):
    from ponderlm.errors import ConfigError
    from ponderlm.hf.register import install as _install_hf_hook
    from ponderlm.model.config import ModelConfig
    from ponderlm.model.generate import GenerateOutput, generate
    from ponderlm.model.losses import ponder_loss
    from ponderlm.model.model import PonderLM, PonderOutput

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

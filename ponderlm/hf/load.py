"""Reading transformers directories quietly: a ponderlm export (:func:`load_export`), and the
context in which transformers reads anything here (no progress bars or load reports around a
one-line error)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ponderlm.errors import CheckpointError, ConfigError
from ponderlm.limits import read_json_limited
from ponderlm.model.config import ModelConfig
from ponderlm.model.model import PonderLM
from ponderlm.model.size import check_model_fits


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off for a while (restored after)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def first_line(e: Exception) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def load_export(path: Path) -> PonderLM:
    """The ponderlm model inside a transformers export (on the CPU, float32), its sizes checked
    against the memory there is before transformers allocates anything."""
    from ponderlm.hf.modeling import PonderLMForCausalLM

    try:  # the sizes config.json declares, refused before transformers allocates them
        cfg = ModelConfig.from_dict(read_json_limited(path / "config.json", "config.json")["ponder"])
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable ponderlm export (config.json: {str(e)[:300]})") from None
    check_model_fits(cfg, f"{path}: the model of config.json", prefix="ponder.")
    try:
        with quiet_transformers():  # no progress bar or load report around a one-line error
            model = PonderLMForCausalLM.from_pretrained(path).model
    except Exception as e:  # transformers and safetensors raise their own types for damaged files
        raise CheckpointError(f"{path}: not a readable ponderlm export ({first_line(e)})") from None
    return model

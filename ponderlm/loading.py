"""Loading a model for inference, whatever wrote it: a trainer run directory, one of its
checkpoint directories, a ``ponderlm convert`` run, or a transformers export (``ponderlm export``,
``save_pretrained``); and finding the dataset a checkpoint was trained on.

Every command that reads a model (eval, analyze, generate, export, lm-eval, experiments) comes
through :func:`load_model`, so a directory is resolved, checked and reported the same way
everywhere: a missing, damaged or tokenizer-less model is one :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import yaml

from ponderlm.data import load_meta
from ponderlm.data.tokenizer import Tokenizer
from ponderlm.device import resolve_device
from ponderlm.errors import CheckpointError, DataError
from ponderlm.limits import MAX_METADATA_BYTES, read_json_limited, read_limited
from ponderlm.model.model import PonderLM
from ponderlm.runs.checkpoint import load_checkpoint, load_model_weights, resolve_checkpoint


def is_hf_export(path: str | Path) -> bool:
    """A directory written by ``ponderlm export`` / ``save_pretrained`` (config.json of model_type ponderlm)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:  # bounded: a config.json of gigabytes, or nested too deeply to parse, is not an export
        return read_json_limited(cfg, "config.json").get("model_type") == "ponderlm"
    except (ValueError, OSError, AttributeError):
        return False


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[PonderLM, Tokenizer, Path]:
    """A trainer run/checkpoint directory or a transformers export -> (model in eval mode on
    ``device``, tokenizer, the directory it was read from). ``device`` is a torch.device or a name
    for :func:`ponderlm.device.resolve_device` (checked before anything is read)."""
    device = resolve_device(device) if isinstance(device, str) else device
    model, tok, path = _load_export(Path(checkpoint)) if is_hf_export(checkpoint) else _load_trained(checkpoint)
    return model.to(device).eval(), tok, path


def _load_export(path: Path) -> tuple[PonderLM, Tokenizer, Path]:
    """The ponderlm model inside a transformers export, and the export's tokenizer."""
    from ponderlm.hf.load import load_export  # transformers: imported only for an export

    model = load_export(path)
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json in this export")
    return model, _model_tokenizer(path, model), path


def _load_trained(checkpoint: str | Path) -> tuple[PonderLM, Tokenizer, Path]:
    """The model of a run's latest checkpoint (or of the checkpoint directory given), and its tokenizer."""
    ck_dir = resolve_checkpoint(checkpoint)
    ck = load_checkpoint(ck_dir, with_optimizer=False)
    model = PonderLM(ck["model_config"])
    load_model_weights(model, ck["model_state"])
    tok_file = ck_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{ck_dir}: no tokenizer.json saved with this checkpoint")
    return model, _model_tokenizer(ck_dir, model), ck_dir


def _model_tokenizer(where: Path, model: PonderLM) -> Tokenizer:
    """The tokenizer.json beside a model (with the chat template and special tokens of a
    tokenizer_config.json there), refused when it has ids the model has no embedding for (they
    would fail inside the embedding lookup, or the tokenizer is another model's)."""
    tok = Tokenizer.load(where / "tokenizer.json", with_config=True)  # and a chat template beside it
    if tok.vocab_size > model.cfg.vocab_size:
        raise CheckpointError(
            f"{where}: tokenizer.json has {tok.vocab_size} entries, more than the model's vocab_size "
            f"{model.cfg.vocab_size} (ids beyond it have no embedding); it is not this model's tokenizer"
        )
    return tok


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def checkpoint_dataset(ck_dir: Path, data_dir: Path | None) -> tuple[Path, dict]:
    """The dataset to evaluate a checkpoint on (default: the one it was trained on, from its
    config.yaml), checked to share the checkpoint's tokenizer. Returns (data_dir, meta)."""
    if data_dir is None:
        run_cfg = {}
        if (ck_dir / "config.yaml").is_file():
            try:  # bounded, as every metadata file of a checkpoint
                run_cfg = yaml.safe_load(read_limited(ck_dir / "config.yaml", MAX_METADATA_BYTES, "config.yaml"))
            except (ValueError, yaml.YAMLError, RecursionError, OSError) as e:
                raise DataError(f"{ck_dir}/config.yaml is not a readable run config ({str(e)[:200]})") from None
        train_cfg = run_cfg.get("train") if isinstance(run_cfg, dict) else None
        found = train_cfg.get("data_dir") if isinstance(train_cfg, dict) else None
        if not found:
            raise DataError(f"{ck_dir}: no train.data_dir in config.yaml; pass the dataset directory")
        data_dir = Path(found)
    meta = load_meta(data_dir)
    if _sha(Path(data_dir) / meta["tokenizer"]["file"]) != _sha(ck_dir / "tokenizer.json"):
        raise DataError(f"{data_dir} was tokenized with another tokenizer than {ck_dir}")
    return Path(data_dir), meta

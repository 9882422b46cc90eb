import json

import pytest

from ponderlm import ConfigError, ModelConfig
from ponderlm.model.config import check_tau


def test_json_round_trip(tmp_path):
    cfg = ModelConfig(
        vocab_size=100,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        method="ponderlm3",
        jacobi_train_iters=(1, 4),
        router="mlp",
        penalty="target_budget",
        tau=0.01,
    )
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "ponderlm3"
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_defaults_and_derived():
    cfg = ModelConfig(d_model=64, n_heads=4)
    assert cfg.n_kv_heads is None and cfg.kv_heads == 4 and cfg.head_dim == 16
    assert ModelConfig(method="vanilla", max_ponder_steps=3).n_latent == 0
    assert ModelConfig(method="ponderlm2", max_ponder_steps=3).slots_per_token == 4
    assert abs(ModelConfig(d_model=64, n_heads=4).embed_scale - (2.5 * 64) ** 0.5) < 1e-12


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(d_model=60, n_heads=8), "divisible by n_heads"),
        (dict(n_heads=8, n_kv_heads=3), "divisible by n_kv_heads"),
        (dict(method="ponderlm3", max_ponder_steps=0), "max_ponder_steps (K) >= 1"),
        (dict(method="ponderlm9"), "method must be one of"),
        (dict(tau=0.0), "tau must be in the open interval"),
        (dict(tau=1.0), "tau must be in the open interval"),
        (dict(router="gru"), "router must be one of"),
        (dict(penalty="l2"), "penalty must be one of"),
        (dict(jacobi_train_iters=()), "jacobi_train_iters"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(log_floor=0.0), "log_floor"),
    ],
)
def test_validation_messages(changes, needle):
    base = dict(d_model=64, n_heads=4)
    base.update(changes)
    with pytest.raises(ConfigError) as exc:
        ModelConfig(**base)
    assert needle in str(exc.value)


def test_unknown_field_rejected():
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"d_model": 64, "n_heads": 4, "n_layer": 3})


def test_check_tau():
    assert check_tau(1e-4) == 1e-4
    for bad in (-1, 0, 1, 2, float("nan")):
        with pytest.raises(ConfigError):
            check_tau(bad)


def test_a_saved_config_that_predates_a_field_reads_as_every_pass_backpropagated(tmp_path):
    """jacobi_grad_passes arrived after runs were saved with every pass backpropagated: a saved
    model config without it reads as 0, that computation (the default), and one with it keeps it."""
    saved = ModelConfig(vocab_size=64, jacobi_grad_passes=2).to_dict()
    del saved["jacobi_grad_passes"]
    p = tmp_path / "model_config.json"
    p.write_text(json.dumps(saved))
    assert ModelConfig.load(p).jacobi_grad_passes == 0
    assert ModelConfig.from_dict({**saved, "jacobi_grad_passes": 1}).jacobi_grad_passes == 1
    assert ModelConfig.from_dict(saved).jacobi_grad_passes == ModelConfig().jacobi_grad_passes

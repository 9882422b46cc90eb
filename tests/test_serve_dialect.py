"""The OpenAI dialect real clients send (issue 32), against one real ``ponderlm serve`` process on
127.0.0.1 (started with an API key), with the official ``openai`` client and raw JSON for the odd fields.

What is checked: every field of OpenAI's and vLLM's completions and chat request models is accepted
at a value that does not change the answer (the greedy answer is the same as without it), and any
other value is a 400 in OpenAI's shape naming the field; more than 4 stop strings (lm-eval sends a
task's 4 ``until`` strings and EOS); chat content as text parts, the developer role, an assistant's
null content; vLLM's /tokenize, /detokenize and /tokenizer_info (lm-eval's remote tokenizer),
which equal the tokenizer's own encode/decode, need the API key and are counted in /metrics.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from test_serve import Server, tiny_p3  # noqa: E402

API_KEY = "dialect"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
N = 8  # tokens per answer: enough to differ, few enough to be quick


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_p3(tmp_path_factory.mktemp("dialect"), 256)


@pytest.fixture(scope="module")
def server(run):
    s = Server(run, "--max-batch", "4", "--api-key", API_KEY)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def tok(run):
    from ponderlm.loading import load_model

    return load_model(run)[1]


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=60)


def complete(server: Server, **fields) -> dict:
    r = post(server, "/v1/completions", {"model": server.model, "prompt": "The king", "max_tokens": N,
                                         "temperature": 0, **fields})  # fmt: skip
    assert r.status_code == 200, (fields, r.text)
    return r.json()


def chat(server: Server, messages: list[dict] | None = None, **fields) -> dict:
    messages = messages or [{"role": "user", "content": "The king"}]
    r = post(server, "/v1/chat/completions", {"model": server.model, "messages": messages, "max_tokens": N,
                                              "temperature": 0, **fields})  # fmt: skip
    assert r.status_code == 200, (fields, r.text)
    return r.json()


def answer(r: dict) -> tuple[str, list[int]]:
    c = r["choices"][0]
    return c.get("text", c.get("message", {}).get("content")), c["ponder_depths"]


# every field of the two models at a value that does not change the answer; (null is tried for each too)
NEUTRAL_BOTH = {
    "n": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "user": "u-1",
    "response_format": {"type": "text"}, "use_beam_search": False, "top_k": -1, "min_p": 0, "repetition_penalty": 1,
    "watermarking": False, "length_penalty": 1.0, "stop_token_ids": [], "include_stop_str_in_output": False,
    "min_tokens": 0, "spaces_between_special_tokens": False, "truncation_side": "left", "bad_words": [],
    "logits_processors": [], "priority": 0, "request_id": "r-1", "session_id": "s-1",
    "return_tokens_as_token_ids": False, "return_token_ids": False, "routed_experts_prompt_start": 0,
    "return_token_offsets": True, "return_mm_kwargs": False, "cache_salt": "salt", "kv_transfer_params": {},
    "vllm_xargs": {}, "thinking_token_budget": -1, "stream_interval": 3, "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": " ", "skip_special_tokens": True, "add_special_tokens": True, "ignore_eos": False,
    "stream": False, "stream_options": None, "seed": 5, "stop": [],
}  # fmt: skip
NULL_ONLY_BOTH = ["truncate_prompt_tokens", "allowed_token_ids", "prompt_logprobs", "logprob_token_ids",
                  "prompt_embeds", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                  "guided_grammar", "ec_transfer_params", "repetition_detection", "temperature", "top_p",
                  "max_tokens"]  # fmt: skip
NEUTRAL_COMPLETION = {"best_of": 1, "echo": False, "suffix": ""}
NULL_ONLY_COMPLETION = ["logprobs"]
NEUTRAL_CHAT = {
    "logprobs": False, "top_logprobs": 0, "function_call": "none", "functions": [], "metadata": {"a": "b"},
    "modalities": ["text"], "parallel_tool_calls": True, "prediction": {"type": "content", "content": "x"},
    "prompt_cache_key": "k", "prompt_cache_retention": "24h", "prompt_cache_options": {"x": 1},
    "reasoning_effort": "none", "safety_identifier": "id", "service_tier": "auto", "store": True,
    "tool_choice": "none", "tools": [], "echo": False, "documents": [], "chat_template_kwargs": {},
    "media_io_kwargs": {}, "mm_processor_kwargs": {}, "include_reasoning": True, "return_prompt_text": False,
    "add_generation_prompt": True, "continue_final_message": False, "max_completion_tokens": N,
}  # fmt: skip
NULL_ONLY_CHAT = ["audio", "moderation", "verbosity", "web_search_options", "chat_template"]

# values the server cannot honour: a 400 naming the field
UNSUPPORTED_BOTH = {
    "n": 2, "frequency_penalty": 0.5, "presence_penalty": -1, "logit_bias": {"50": 100},
    "response_format": {"type": "json_object"}, "use_beam_search": True, "top_k": 5, "min_p": 0.1,
    "repetition_penalty": 1.2, "watermarking": True, "length_penalty": 0.5, "stop_token_ids": [3],
    "include_stop_str_in_output": True, "min_tokens": 4, "truncate_prompt_tokens": 10, "allowed_token_ids": [1, 2],
    "logprob_token_ids": [1], "bad_words": ["king"], "prompt_embeds": "AAAA",
    "structured_outputs": {"json": {}}, "guided_json": {"type": "object"}, "guided_regex": "a+",
    "guided_choice": ["a"], "guided_grammar": "root ::= x", "logits_processors": ["x"], "priority": 1,
    "return_tokens_as_token_ids": True, "return_token_ids": True, "kv_transfer_params": {"a": 1},
    "ec_transfer_params": {"a": 1}, "vllm_xargs": {"a": 1}, "repetition_detection": {"n": 3},
    "thinking_token_budget": 10,
}  # fmt: skip
UNSUPPORTED_COMPLETION = {"best_of": 2, "suffix": "end"}  # echo and logprobs: tests/test_serve_logprobs.py
# (chat: top_logprobs without logprobs; chat logprobs themselves: tests/test_serve_logprobs.py)
UNSUPPORTED_CHAT = {
    "top_logprobs": 2, "audio": {"voice": "x"}, "function_call": "auto",
    "functions": [{"name": "f"}], "modalities": ["text", "audio"], "moderation": {"x": 1},
    "reasoning_effort": "high", "tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f"}}],
    "verbosity": "low", "web_search_options": {}, "echo": True, "documents": [{"text": "d"}],
    "chat_template": "{{ messages }}", "chat_template_kwargs": {"x": 1}, "media_io_kwargs": {"image": {}},
    "mm_processor_kwargs": {"x": 1}, "return_prompt_text": True,
}  # fmt: skip

# the dialect's rows of docs/ERRORS.md's server table: (case id, path, body, status, what the message says)
REFUSED = [
    ("unsupported_value", "/v1/completions", {"prompt": "The", "presence_penalty": 0.5}, 400,
     "presence_penalty: 0.5 is not supported; this server takes only 0 (or null)"),
    ("unsupported_stream_option", "/v1/completions",
     {"prompt": "The", "stream": True, "stream_options": {"continuous_usage_stats": True}}, 400,
     "stream_options.continuous_usage_stats: true is not supported"),
    ("unsupported_content_part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look"},
                                                {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     400, 'messages.0.content.1: content parts of type "image_url" are not supported; this server takes only text'),
    ("null_content", "/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400,
     "messages.0.content: null is allowed only in an assistant message"),
    ("continue_and_generation", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "Hi"}], "continue_final_message": True, "add_generation_prompt": True},
     400, "continue_final_message and add_generation_prompt cannot both be true"),
    ("tokenize_neither", "/tokenize", {}, 400, "give either prompt or messages"),
    ("token_out_of_range", "/detokenize", {"tokens": [1, 10**9]}, 400,
     "tokens.1: 1000000000 is not a token id of this tokenizer (0 to V-1)"),
    ("prompt_token_out_of_range", "/v1/completions", {"prompt": [[5, 6], [7, 10**9]]}, 400,
     "prompt.1.1: 1000000000 is not a token id of this tokenizer (0 to V-1)"),
    ("prompt_empty_list", "/v1/completions", {"prompt": []}, 400, "prompt: an empty list is not a prompt"),
    ("too_many_prompts", "/v1/completions", {"prompt": ["x"] * 69}, 400,
     "prompt: a list of 69 prompts; this server takes at most 68 in one request (--max-batch + --max-queue)"),
    ("logprobs_out_of_range", "/v1/completions", {"prompt": "The", "logprobs": 21}, 400,
     "logprobs: 21 is out of range; this server takes 0 to 20 (the top alternatives of each token) or null"),
    ("top_logprobs_without_logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, 400,
     "top_logprobs: 2 is not supported without logprobs: true"),
    ("prompt_logprobs_streamed", "/v1/completions", {"prompt": "The", "prompt_logprobs": 1, "stream": True}, 400,
     "prompt_logprobs: 1 is not supported with stream: true (as vLLM)"),
]  # fmt: skip


def test_neutral_fields_leave_the_greedy_answer_unchanged(server):
    base = answer(complete(server))
    fields = {**NEUTRAL_BOTH, **NEUTRAL_COMPLETION}
    for name, value in fields.items():
        assert answer(complete(server, **{name: value})) == base, name
    assert answer(complete(server, **fields)) == base  # all at once
    for name in [*fields, *NULL_ONLY_BOTH, *NULL_ONLY_COMPLETION]:
        if name not in ("max_tokens", "temperature"):  # null max_tokens is 16 tokens; null temperature is 1
            assert answer(complete(server, **{name: None})) == base, name
    assert answer(complete(server, temperature=None, seed=3)) == answer(complete(server, temperature=1, seed=3))
    base_chat = answer(chat(server))
    fields = {**NEUTRAL_BOTH, **NEUTRAL_CHAT}
    for name, value in fields.items():
        assert answer(chat(server, **{name: value})) == base_chat, name
    assert answer(chat(server, **fields)) == base_chat
    for name in [*fields, *NULL_ONLY_BOTH, *NULL_ONLY_CHAT]:
        if name not in ("max_tokens", "max_completion_tokens", "temperature"):
            assert answer(chat(server, **{name: None})) == base_chat, name


def test_unsupported_values_are_a_400_naming_the_field(server):
    cases = [
        ("/v1/completions", {"prompt": "The"}, name, v)
        for name, v in {**UNSUPPORTED_BOTH, **UNSUPPORTED_COMPLETION}.items()
    ]
    cases += [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, name, v) for name, v in
              {**UNSUPPORTED_BOTH, **UNSUPPORTED_CHAT}.items()]  # fmt: skip
    for path, body, name, value in cases:
        r = post(server, path, {"model": server.model, "max_tokens": 2, **body, name: value})
        assert r.status_code == 400, (path, name, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == name and err["message"].startswith(f"{name}: ") and "not supported" in err["message"]
    assert "frobnicate" in post(server, "/v1/completions", {"model": server.model, "prompt": "x",
                                                            "frobnicate": 1}).json()["error"]["message"]  # fmt: skip


def test_the_openai_client_with_neutral_and_unsupported_fields(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    base = answer(complete(server))
    r = client.completions.create(model=server.model, prompt="The king", max_tokens=N, temperature=0, n=1,
                                  best_of=1, echo=False, frequency_penalty=0, presence_penalty=0, logit_bias={},
                                  logprobs=None, user="someone", suffix=None, stream_options=None, seed=None,
                                  extra_body={"repetition_penalty": 1, "top_k": 0})  # fmt: skip
    assert (r.choices[0].text, r.choices[0].model_extra["ponder_depths"]) == base
    base_chat = answer(chat(server))
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "The king"}],
                                       max_completion_tokens=N, temperature=0, n=1, store=False,
                                       metadata={"k": "v"}, service_tier="auto", parallel_tool_calls=False,
                                       logprobs=False, top_logprobs=0, tool_choice="none", user="u",
                                       response_format={"type": "text"}, frequency_penalty=0)  # fmt: skip
    assert (r.choices[0].message.content, r.choices[0].model_extra["ponder_depths"]) == base_chat
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt="The", max_tokens=2, n=2)
    assert e.value.body["param"] == "n" and "n: 2 is not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "s"}},
                                       max_tokens=2)  # fmt: skip
    assert e.value.body["param"] == "response_format"


def test_more_than_four_stop_strings(server):
    text, _ = answer(complete(server, max_tokens=30))
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    stops = ["\u2603zz", "qqq1", "qqq2", "qqq3", stop, *[f"never{i}" for i in range(59)]]  # 64: the bound
    r = complete(server, max_tokens=30, stop=stops)
    assert r["choices"][0]["text"] == text[: text.index(stop)] and r["choices"][0]["finish_reason"] == "stop"
    r = post(server, "/v1/completions", {"model": server.model, "prompt": "x", "stop": [*stops, "one more"]})
    assert r.status_code == 400 and r.json()["error"]["message"] == "stop takes at most 64 non-empty strings"


def test_chat_messages_in_common_shapes(server):
    def same(a: list[dict], b: list[dict]) -> None:
        assert answer(chat(server, a)) == answer(chat(server, b)), (a, b)

    same([{"role": "user", "content": [{"type": "text", "text": "The "}, {"type": "text", "text": "king"}]}],
         [{"role": "user", "content": "The king"}])  # fmt: skip
    same([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "The king"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The king"}])  # fmt: skip
    same([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": []},
          {"role": "user", "content": "The king"}],
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
          {"role": "user", "content": "The king"}])  # fmt: skip
    for part in ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, {"type": "file", "file": {}},
                 {"type": "text"}):  # fmt: skip
        r = post(server, "/v1/chat/completions", {"model": server.model, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, part]}]})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.1", r.text
    r = post(server, "/v1/chat/completions", {"model": server.model, "messages": [
        {"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.tool_calls", r.text


def test_tokenize_and_detokenize_round_trip(server, tok):
    texts = ["The king", "  spaces\tand\nnewlines  ", "caf\u00e9 \u2603 \U0001f600", "<|endoftext|>", ""]
    for text in texts:
        r = post(server, "/tokenize", {"model": server.model, "prompt": text, "add_special_tokens": False})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got == {"count": len(tok.encode(text)), "max_model_len": 256, "tokens": tok.encode(text),
                       "token_strs": None}  # fmt: skip
        back = post(server, "/detokenize", {"model": server.model, "tokens": got["tokens"]}).json()
        assert back == {"prompt": tok.decode(got["tokens"])} and back["prompt"] == text
    assert post(server, "/tokenize", {"prompt": "The king"}).json()["tokens"] == tok.encode("The king")
    strs = post(server, "/tokenize", {"prompt": "The king", "return_token_strs": True}).json()["token_strs"]
    assert strs == [tok.tk.id_to_token(i) for i in tok.encode("The king")]
    msgs = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    r = post(server, "/tokenize", {"messages": msgs}).json()
    assert r["tokens"] == tok.encode("System: Be brief.\n\nUser: Hi\n\nAssistant:")
    r = post(server, "/tokenize", {"messages": msgs, "add_generation_prompt": False}).json()
    assert r["tokens"] == tok.encode("System: Be brief.\n\nUser: Hi\n\n")
    r = post(server, "/tokenize", {"messages": [*msgs, {"role": "assistant", "content": "Well"}],
                                   "add_generation_prompt": False, "continue_final_message": True}).json()  # fmt: skip
    assert r["tokens"] == tok.encode("System: Be brief.\n\nUser: Hi\n\nAssistant: Well")
    # the same bound as prompts, before tokenizing; a model this server does not serve is a 404
    r = post(server, "/tokenize", {"prompt": "ab " * 200_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert post(server, "/tokenize", {"model": "gpt-4", "prompt": "x"}).status_code == 404
    assert post(server, "/detokenize", {"tokens": [-1]}).status_code == 400


def test_tokenizer_info_serves_lm_evals_remote_tokenizer(server, tok):
    info = httpx.get(f"{server.url}/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 256
    assert {"bos_token", "pad_token", "chat_template"} <= set(info)
    assert post(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"] == [
        tok.eot_id
    ]
    try:
        from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support
    except ImportError:  # an lm-eval without the remote tokenizer (before 0.4.9)
        return
    base = f"{server.url}/v1/completions"
    assert check_remote_tokenizer_support(base, auth_token=API_KEY)
    assert not check_remote_tokenizer_support(base, auth_token="wrong", max_retries=1)
    remote = RemoteTokenizer(base, auth_token=API_KEY)
    assert remote.eos_token_id == tok.eot_id and remote.encode("The king") == tok.encode("The king")
    assert remote.decode(tok.encode("The king")) == "The king"


def test_tokenizer_endpoints_need_the_key_and_are_counted(server):
    m0 = server_metrics(server)
    for method, path, body in (("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("GET", "/tokenizer_info", None)):  # fmt: skip
        assert httpx.request(method, f"{server.url}{path}", json=body).status_code == 401
        assert httpx.request(method, f"{server.url}{path}", json=body, headers=AUTH).status_code == 200
    m = server_metrics(server)
    for path in ("/tokenize", "/detokenize", "/tokenizer_info"):
        for status in (200, 401):
            key = f'ponderlm_http_requests_total{{path="{path}",status="{status}"}}'
            assert m.get(key, 0) - m0.get(key, 0) == 1, (key, m)


def server_metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    return {k: float(v) for k, v in re.findall(r"^(\S+) (\S+)$", text, flags=re.M) if not k.startswith("#")}


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_the_dialects_refusals(server, case):
    _, path, body, status, says = case
    r = post(server, path, {"model": server.model, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert says in re.sub(r"\(0 to \d+\)", "(0 to V-1)", err["message"]), (says, err["message"])
    assert err["param"] is not None


def test_lm_evals_local_completions_generates_with_five_stops(server, tok):
    """lm-eval's own API model (needs the eval-http extra: aiohttp, tenacity), as `lm_eval --model
    local-completions` builds it: the remote tokenizer found by itself, a task's 4 `until` strings
    sent with its end-of-text (5 stops), each answer the server's greedy text cut at the first."""
    pytest.importorskip("tenacity")
    pytest.importorskip("aiohttp")
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.openai_completions import LocalCompletionsAPI
    except ImportError:
        pytest.skip("lm-eval's API models are not installed")
    lm = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model=server.model, auth_token=API_KEY,
                             header=AUTH, tokenized_requests=False, max_length=256, max_retries=1)  # fmt: skip
    assert lm.tokenizer_backend == "remote"
    full, _ = answer(complete(server, prompt="The king", max_tokens=40))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    until = ["\u2603a", "\u2603b", "\u2603c", stop]
    gen = {"until": until, "max_gen_toks": 40, "temperature": 0, "do_sample": False}
    reqs = [Instance("generate_until", {}, ("The king", dict(gen)), i) for i in range(2)]
    assert lm.generate_until(reqs, disable_tqdm=True) == [full[: full.index(stop)]] * 2

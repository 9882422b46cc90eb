"""``ponderlm serve`` run the way users run it: a real server process on 127.0.0.1 (a free port),
the official ``openai`` client and httpx as clients, a tiny trained PonderLM-3 made here.

What is checked: greedy output (text and per-token depths) equals ``generate`` on the same prompt
alone while other requests arrive and leave; malformed, unknown, out-of-range and too-long
requests get a 400 in OpenAI's error shape and disturb nothing in flight; a full queue answers 429
with Retry-After; a client that disconnects frees its row and cache (streamed or not); the API key
is enforced; SIGTERM finishes the streams and exits 0. Every limit on what a client sends (head,
body, prompt, fields; issue 30) is refused in OpenAI's shape by a real server while a stream
decodes, and docs/ERRORS.md's server table lists exactly these cases; an unexpected exception is
a 500 of one log line; a stop string is counted as "stop".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from errorcases import TINY  # noqa: E402
from fakepkgs import build_fake_dataset  # noqa: E402

TAU = "0.4"  # spread depths: the tiny router's distribution is flat
PROMPTS = ["The king", "Of the people and", "It was a", "What is the", "There were no", "In a year"]


def tiny_p3(root: Path, context: int) -> Path:
    """A tiny PonderLM-3 trained two steps in ``root/p3`` (a router that varies depths)."""
    from ponderlm.runs.config import load_run_config
    from ponderlm.training.trainer import train

    ds = build_fake_dataset(root)
    cfg, explicit = load_run_config(None, [*TINY, f"model.max_seq_len={context}", "model.method=ponderlm3",
                                           "model.router_init_bias=0.0", f"train.data_dir={ds}",
                                           f"train.out_dir={root / 'p3'}"])  # fmt: skip
    train(cfg, explicit, log=lambda *_: None)
    return root / "p3"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The tiny PonderLM-3 of context 256."""
    return tiny_p3(tmp_path_factory.mktemp("serve"), 256)


@pytest.fixture(scope="module")
def reference(run):
    """What `ponderlm generate --prefill exact` computes for one prompt (greedy, EOS stops):
    (text, depths). The server walks prompts this short through the batch: the exact recurrence."""
    from ponderlm.loading import load_model

    model, tok, _ = load_model(run)

    def ref(prompt: str, n: int) -> tuple[str, list[int]]:
        ids = torch.tensor([tok.encode(prompt)])
        out = model.generate(ids, n, eos_token_id=tok.eot_id, tau=float(TAU), prefill="exact",
                             on_token=lambda *_: None)  # fmt: skip
        new = out.tokens[0, out.prompt_depth.shape[1] :].tolist()
        k = new.index(tok.eot_id) if tok.eot_id in new else len(new)
        return tok.decode(new[:k]), out.depth[0, :k].tolist()

    return ref


class Server:
    """`python -m ponderlm serve ...` on a free port, until stopped (``launch``: the Python code
    that runs the command line instead of ``-m ponderlm``, e.g. with a fault injected first)."""

    def __init__(self, run: Path, *args: str, env: dict | None = None, launch: str | None = None) -> None:
        head = [sys.executable, "-m", "ponderlm"] if launch is None else [sys.executable, "-c", launch]
        cmd = [*head, "serve", "--checkpoint", str(run), "--port", "0", "--tau", TAU, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip
        line = self.proc.stdout.readline()  # "serving NAME (...) on http://127.0.0.1:PORT" once ready
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert m, (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.url = m.group(1)
        self.model = run.name
        self.children = _children(self.proc.pid)  # the engine process (and multiprocessing's helper)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=KEY).text
        return {k: float(v) for k, v in re.findall(r"^(\S+) (\S+)$", text, flags=re.M) if not k.startswith("#")}

    def wait_metric(self, name: str, value: float, timeout: float = 20.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self.metrics()
            if m.get(name) == value:
                return m
            time.sleep(0.05)
        raise AssertionError(f"{name} never reached {value}: {self.metrics()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(run):
    s = Server(run, "--max-batch", "3", "--max-queue", "16")
    yield s
    assert s.stop() == 0


def _client(server: Server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def _stream_chunks(server: Server, body: dict, on_first=None, headers=None) -> list[dict]:
    """A streamed completion read with httpx: the parsed chunks up to [DONE]."""
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"model": server.model, "stream": True, **body},
                      timeout=60, headers=headers) as r:  # fmt: skip
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunks.append(json.loads(line[6:]))
            if on_first is not None and len(chunks) == 1:
                on_first()
    return chunks


def test_openai_client_interleaved_requests_equal_generate(server, reference):
    """Six requests of different lengths, started at different times into a batch of 3 (so rows
    join and leave while others decode), half streamed: each is generate's greedy output."""
    client = _client(server)
    lengths = [30, 7, 45, 12, 25, 3]
    results: dict[int, tuple[str, list[int], object]] = {}

    def one(i: int) -> None:
        time.sleep(0.05 * i)
        if i % 2:
            text, depths, usage = "", [], None
            opts = {"include_usage": True}
            chunks = client.completions.create(model=server.model, prompt=PROMPTS[i], max_tokens=lengths[i],
                                               temperature=0, stream=True, stream_options=opts)  # fmt: skip
            for ch in chunks:
                if ch.choices:
                    text += ch.choices[0].text
                    depths += ch.choices[0].model_extra["ponder_depths"]
                if ch.usage is not None:
                    usage = ch.usage
            results[i] = (text, depths, usage)
        else:
            r = client.completions.create(model=server.model, prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)
            results[i] = (r.choices[0].text, r.choices[0].model_extra["ponder_depths"], r.usage)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, p in enumerate(PROMPTS):
        text, depths, usage = results[i]
        assert (text, depths) == reference(p, lengths[i]), i
        assert usage.completion_tokens == len(depths) and usage.model_extra["flops"] > 0
    assert len({d for _, ds, _ in results.values() for d in ds}) > 1  # the router did vary the depth
    m = server.wait_metric("ponderlm_batch_rows", 0)
    assert m["ponderlm_cache_entries"] == 0 and m["ponderlm_queue_length"] == 0


def test_chat_models_and_health(server, reference):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [server.model]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "The king"}],
                                       max_tokens=10, temperature=0)  # fmt: skip
    text, depths = reference("User: The king\n\nAssistant:", 10)
    assert r.choices[0].message.content == text.split("\n\nUser:")[0]  # the plain template and its stop
    assert r.choices[0].model_extra["ponder_depths"] == depths[: len(r.choices[0].model_extra["ponder_depths"])]
    seeded = [client.completions.create(model=server.model, prompt="The", max_tokens=8, temperature=1.0, seed=3,
                                        top_p=0.9).choices[0].text for _ in range(2)]  # fmt: skip
    assert seeded[0] == seeded[1]


BAD = [  # (case id in docs/ERRORS.md, body or raw bytes, status, what the message says)
    ("invalid_json", b'{"model": "p3", "prompt": ', 400, "the body is not valid JSON"),
    ("unknown_field", {"prompt": "The", "max_tokens": 4, "frobnicate": 1}, 400, "unknown field: frobnicate"),
    ("out_of_range", {"prompt": "The", "temperature": 7}, 400, "temperature: Input should be less than or equal to 2"),
    ("max_tokens_zero", {"prompt": "The", "max_tokens": 0}, 400,
     "max_tokens: 0 is allowed only with echo (the prompt scored, nothing generated)"),
    ("n_above_one", {"prompt": "The", "n": 2}, 400, "n: 2 is not supported; this server takes only 1"),
    ("prompt_too_many_tokens", {"prompt": "the " * 300, "max_tokens": 4}, 400,
     "this model's context is 256 tokens: the prompt has"),
    ("unknown_model", {"prompt": "The", "max_tokens": 4, "model": "gpt-4"}, 404, "does not exist"),
]  # fmt: skip


def test_bad_requests_get_openai_errors_and_disturb_nothing(server, reference):
    """While a long stream decodes, every kind of bad request gets its error; the stream's output
    is still generate's."""
    errors = []

    def send_bad() -> None:
        for _, body, status, says in BAD:
            if isinstance(body, bytes):
                r = httpx.post(
                    f"{server.url}/v1/completions", content=body, headers={"Content-Type": "application/json"}
                )
            else:
                r = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, **body})
            errors.append((r.status_code, r.json(), status, says))

    chunks = _stream_chunks(server, {"prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0}, on_first=send_bad)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    depths = [d for c in chunks for d in c["choices"][0]["ponder_depths"]]
    assert (text, depths) == reference(PROMPTS[0], 60)
    assert len(errors) == len(BAD)
    for got, body, status, says in errors:
        assert got == status and set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"} and says in body["error"]["message"], body


def test_disconnect_frees_the_row(server):
    m0 = server.metrics()
    body = {"model": server.model, "prompt": "The", "max_tokens": 250, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    cancelled = m0.get('ponderlm_requests_finished_total{reason="cancelled"}', 0) + 1
    m = server.wait_metric('ponderlm_requests_finished_total{reason="cancelled"}', cancelled)
    m = server.wait_metric("ponderlm_batch_rows", 0)
    assert m["ponderlm_cache_entries"] == 0


@pytest.fixture(scope="module")
def guarded(run):
    """A server with one row, a queue of one, and an API key (from the environment)."""
    s = Server(run, "--max-batch", "1", "--max-queue", "1", env={"PONDERLM_API_KEY": "sesame"})
    yield s
    assert s.stop() == 0


KEY = {"Authorization": "Bearer sesame"}


def test_api_key(guarded):
    s = guarded
    r = httpx.get(f"{s.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{s.url}/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _client(s, api_key="wrong").models.list()
    assert _client(s, api_key="sesame").completions.create(model=s.model, prompt="The", max_tokens=2).usage


def test_full_queue_gets_429_and_the_others_finish(guarded, reference):
    """Six requests at once on one row and a queue of one: whatever does not fit gets a 429 with
    Retry-After in OpenAI's shape, and every request served is still generate's output."""
    s = guarded
    start = threading.Barrier(6)
    got: dict[int, httpx.Response] = {}

    def one(i: int) -> None:
        body = {"model": s.model, "prompt": PROMPTS[i], "max_tokens": 100, "temperature": 0}
        start.wait()
        got[i] = httpx.post(f"{s.url}/v1/completions", timeout=60, headers=KEY, json=body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    refused = [r for r in got.values() if r.status_code == 429]
    served = {i: r for i, r in got.items() if r.status_code == 200}
    assert len(refused) + len(served) == 6 and refused and served
    for r in refused:
        assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
    for i, r in served.items():
        choice = r.json()["choices"][0]
        assert (choice["text"], choice["ponder_depths"]) == reference(PROMPTS[i], 100)
    assert s.wait_metric("ponderlm_batch_rows", 0)["ponderlm_cache_entries"] == 0


def test_sigterm_finishes_streams_and_exits_0(guarded):
    """SIGTERM mid-stream: the stream still ends with [DONE], and the server exits 0 (last test on this server)."""
    s = guarded
    lines = []
    with httpx.stream("POST", f"{s.url}/v1/completions", headers=KEY, timeout=60,
                      json={"model": s.model, "prompt": "The", "max_tokens": 250, "stream": True}) as r:  # fmt: skip
        for line in r.iter_lines():
            if not lines:
                s.proc.send_signal(signal.SIGTERM)
            if line:
                lines.append(line)
    assert lines[-1] == "data: [DONE]" and len(lines) > 2  # finished, not cut
    assert s.proc.wait(timeout=60) == 0
    err = s.proc.stderr.read()
    assert "Traceback" not in err and "error" not in err, err  # a clean stop reports nothing wrong
    end = time.monotonic() + 10  # multiprocessing's helper notices the closed pipe a moment later under load
    while [pid for pid in s.children if _alive(pid)] and time.monotonic() < end:
        time.sleep(0.05)
    assert not [pid for pid in s.children if _alive(pid)]  # the engine process stopped with it


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # an exited child nobody reaped yet is gone


def test_a_killed_server_leaves_no_engine_behind(run):
    """SIGKILL gives the server no chance to stop its engine process: the engine notices the
    closed pipe and exits by itself."""
    s = Server(run)
    kids = _children(s.proc.pid)
    assert kids, "the engine runs in a child process"
    s.proc.kill()
    s.proc.wait(timeout=30)
    end = time.monotonic() + 20
    while [pid for pid in kids if _alive(pid)] and time.monotonic() < end:
        time.sleep(0.1)
    assert not [pid for pid in kids if _alive(pid)]


def test_stop_strings_are_cut_and_their_starts_held_back():
    from ponderlm.serving.protocol import CHAT_STOP, split_at_stop
    from ponderlm.serving.responses import Stream
    from ponderlm.serving.scheduler import Token

    assert split_at_stop("Hello wor", ["world"]) == ("Hello wor", False, 3)
    assert split_at_stop("Hello world!", ["world", "lo"]) == ("Hel", True, 0)

    class Chars:  # a tokenizer whose tokens are characters
        def decode(self, ids):
            return "".join(map(chr, ids))

    text = "ab\n\nUser: more"
    toks = [Token(ord(c), i % 3) for i, c in enumerate(text)]
    for size in (1, 3):  # one token per chunk, or several (a stream whose client fell behind)
        stream = Stream(Chars(), [CHAT_STOP])
        pieces = [stream.push(toks[i : i + size]) for i in range(0, len(toks), size)]
        sent = "".join(text for text, _ in pieces)
        assert sent == "ab" and stream.stopped and stream.sent == "ab"
        assert [d for _, ds in pieces for d in ds] == [i % 3 for i in range(len(text))]  # every token's, in order


def test_a_dead_engine_gives_503_and_the_server_still_stops_cleanly(run):
    s = Server(run)
    try:
        engine = [pid for pid in s.children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(engine) == 1
        os.kill(engine[0], signal.SIGKILL)
        end = time.monotonic() + 20
        while httpx.get(f"{s.url}/health").status_code != 503 and time.monotonic() < end:
            time.sleep(0.05)
        assert httpx.get(f"{s.url}/health").status_code == 503
        r = httpx.post(f"{s.url}/v1/completions", json={"model": s.model, "prompt": "The", "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"
    finally:
        assert s.stop() == 0
    assert "engine process exited" in s.proc.stderr.read()


# ---------------------------------------------------------------------------------------------- limits (issue 30)
LIMIT_BODY = 65536  # the `limited` server's --max-body-bytes
LIMIT_TIMEOUT = 1.0  # its --request-timeout


@pytest.fixture(scope="module")
def long_run(tmp_path_factory) -> Path:
    """The tiny PonderLM-3 with a context of 2048 tokens: requests long enough that a disconnect shows."""
    return tiny_p3(tmp_path_factory.mktemp("serve_long"), 2048)


@pytest.fixture(scope="module")
def limited(long_run):
    """A server with a small body cap (64 KiB) and a short request timeout (1 s)."""
    limits = ["--max-body-bytes", str(LIMIT_BODY), "--request-timeout", str(LIMIT_TIMEOUT)]
    s = Server(long_run, "--max-batch", "2", *limits)
    yield s
    assert s.stop() == 0


def _raw(server: Server, head: str, chunks=(), limit_s: float = 20.0) -> tuple[int, dict | str | None, int]:
    """One request as raw bytes: ``head`` (the request line and headers), then each body chunk until
    the server answers. Returns (status, the JSON body (or the text of one that is not JSON), body
    bytes sent)."""
    import select
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    sent, resp = 0, b""
    with socket.create_connection((host, int(port)), timeout=limit_s) as sock:
        sock.sendall(head.encode())
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:  # the server answered: stop sending
                break
            try:
                sock.sendall(chunk)
            except OSError:  # it answered and closed while we wrote
                break
            sent += len(chunk)
        end = time.monotonic() + limit_s
        with contextlib.suppress(OSError):
            while time.monotonic() < end and not _complete(resp):
                data = sock.recv(1 << 16)
                if not data:
                    break
                resp += data
    if not resp:
        return 0, None, sent
    status = int(resp.split(b" ", 2)[1])
    head_end = resp.index(b"\r\n\r\n") + 4
    headers = resp[:head_end].decode("latin-1").lower()
    m = re.search(r"content-length: (\d+)", headers)
    body = resp[head_end : head_end + int(m.group(1))] if m else b""
    return status, json.loads(body) if body.startswith(b"{") else body.decode(errors="replace"), sent


def _complete(resp: bytes) -> bool:
    if b"\r\n\r\n" not in resp:
        return False
    head, body = resp.split(b"\r\n\r\n", 1)
    m = re.search(rb"content-length: (\d+)", head.lower())
    return m is not None and len(body) >= int(m.group(1))


def _post_head(length: int | None = None, path: str = "/v1/completions") -> str:
    how = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{how}\r\n\r\n"


def _json(server: Server, body, path: str = "/v1/completions") -> tuple[int, dict | None, int]:
    raw = body if isinstance(body, bytes) else json.dumps({"model": server.model, **body}).encode()
    r = httpx.post(f"{server.url}{path}", content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    return r.status_code, r.json(), len(raw)


def _chunked(total: int, size: int = 1 << 16):
    piece = f"{size:x}\r\n".encode() + b"x" * size + b"\r\n"
    return (piece for _ in range(total // size))


# (case id in docs/ERRORS.md, the request against the `limited` server, status, what the message says)
LIMITS = [
    ("body_too_large", lambda s: _json(s, {"prompt": "x" * LIMIT_BODY}), 413,
     "this server takes at most 65536 (--max-body-bytes)"),
    ("chunked_body_too_large", lambda s: _raw(s, _post_head(), _chunked(32 << 20)), 413,
     "the request body is larger than 65536 bytes, the most this server takes (--max-body-bytes)"),
    ("body_too_slow", lambda s: _raw(s, _post_head(1000), [b'{"model": "p']), 408,
     "the request body did not arrive within 1 seconds (--request-timeout)"),
    ("content_length_short", lambda s: _raw(s, _post_head(5), [b'{"model": "p3", "prompt": "The"}']), 400,
     "Invalid HTTP request received."),
    ("prompt_too_many_characters", lambda s: _json(s, {"prompt": "ab " * 9000}), 400,
     "tokens, which no prompt of more than"),
    ("prompt_too_many_tokens_long", lambda s: _json(s, {"prompt": "the " * 2100, "max_tokens": 4}), 400,
     "this model's context is 2048 tokens: the prompt has"),
    ("max_tokens_huge", lambda s: _json(s, {"prompt": "The", "max_tokens": 10**30}), 400,
     "max_tokens asks for 1000000000000000000000000000000"),
    ("prompt_lone_surrogate", lambda s: _json(s, b'{"model": "p3long", "prompt": "The \\ud800 king"}'), 400,
     "prompt is not valid UTF-8 text (U+D800, a lone surrogate, at character 4)"),
    ("chat_lone_surrogate", lambda s: _json(s, b'{"model": "p3long", "messages": [{"role": "user", "content": '
                                               b'"ok"}, {"role": "user", "content": "\\udfff"}]}',
                                            "/v1/chat/completions"), 400,
     "messages.1.content is not valid UTF-8 text (U+DFFF, a lone surrogate, at character 0)"),
    ("stop_lone_surrogate", lambda s: _json(s, b'{"model": "p3long", "prompt": "The", "stop": ["\\ud83d"]}'), 400,
     "stop is not valid UTF-8 text (U+D83D, a lone surrogate,"),
    ("stop_too_long", lambda s: _json(s, {"prompt": "The", "stop": "y" * 257}), 400,
     "a stop string may have at most 256 characters"),
    ("too_many_stops", lambda s: _json(s, {"prompt": "The", "stop": [f"s{i}" for i in range(65)]}), 400,
     "stop takes at most 64 non-empty strings"),
    ("json_too_deep", lambda s: _json(s, b"[" * 60000), 400, "There was an error parsing the body"),
    ("headers_too_large", lambda s: _raw(s, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {'a' * 40000}\r\n\r\n"),
     431, "the request's line and headers are larger than 32768 bytes"),
    ("headers_too_slow", lambda s: _raw(s, "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"), 408,
     "the request's headers did not arrive within 1 seconds (--request-timeout)"),
]  # fmt: skip
# rows of the server table run by other tests of this module: (test, what its message says)
SERVER_ELSEWHERE = {
    "queue_full": ("test_full_queue_gets_429_and_the_others_finish", "rate_limit_error"),
    "engine_down": ("test_a_dead_engine_gives_503_and_the_server_still_stops_cleanly", "engine_down"),
    "wrong_api_key": ("test_api_key", "invalid_api_key"),
    "internal_error": ("test_an_unexpected_exception_is_a_500_of_one_line", "the server failed on this request"),
}


def test_limits_refuse_in_openai_shape_and_disturb_nothing(limited, long_run):
    """Every limit on what a client sends, against a real server, while a stream decodes: each
    request gets its status in OpenAI's error shape; the stream still runs to its end; the
    server is healthy after."""
    from ponderlm.loading import load_model
    from ponderlm.serving.api import longest_token

    _, tok, _ = load_model(long_run)
    got = []

    def send() -> None:
        for case_id, request, status, says in LIMITS:
            got.append((case_id, *request(limited), status, says))

    chunks = _stream_chunks(limited, {"prompt": "The", "max_tokens": 400, "ignore_eos": True}, on_first=send)
    assert sum(len(c["choices"][0]["ponder_depths"]) for c in chunks) == 400
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert [g[0] for g in got] == [c[0] for c in LIMITS]
    for case_id, code, body, sent, status, says in got:
        if case_id == "content_length_short":  # uvicorn's own plain answer to the bytes after the body
            assert code == status and (body == says or "the body is not valid JSON" in str(body)), body
            continue
        assert code == status and isinstance(body, dict) and set(body) == {"error"}, (case_id, code, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, (case_id, body)
        assert says in body["error"]["message"], (case_id, body)
        if case_id == "chunked_body_too_large":  # reading stopped at the cap: most of the 32 MB was never sent
            assert sent < 16 << 20, sent
        if case_id == "prompt_too_many_characters":
            assert f"no prompt of more than {2048 * longest_token(tok)} characters fits" in body["error"]["message"]
    assert httpx.get(f"{limited.url}/health").json() == {"status": "ok"}


def test_the_server_table_lists_every_case():
    """docs/ERRORS.md's server table has one row per case tested here (BAD, LIMITS, the tests
    named in SERVER_ELSEWHERE) and in test_serve_dialect.py (REFUSED), with the message each test asserts."""
    text = (Path(__file__).parents[1] / "docs" / "ERRORS.md").read_text()
    section = text.split("## The server: requests it refuses", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*(\w+)\s*\|", line)
        if m and m.group(1) != "Case":
            assert m.group(1) not in rows, f"duplicate row {m.group(1)}"
            rows[m.group(1)] = line
    from test_serve_dialect import REFUSED  # the dialect's refusals (issue 32), tested there

    expected = {c[0]: c[-1] for c in BAD} | {c[0]: c[-1] for c in LIMITS} | {c[0]: c[-1] for c in REFUSED}
    expected |= {k: says for k, (_, says) in SERVER_ELSEWHERE.items()}
    assert sorted(rows) == sorted(expected)
    for case_id, says in expected.items():
        assert says.replace("|", "\\|") in rows[case_id], (case_id, says)
    module = Path(__file__).read_text()
    for test, says in SERVER_ELSEWHERE.values():
        assert f"def {test}(" in module and says in module, test


FAULT = """
import sys
import ponderlm.serving.api as api
template = api.chat_prompt
def broken(tok, messages, *args):
    if messages[-1].content == "boom":
        raise RuntimeError("injected fault\\nwith a second line")
    return template(tok, messages, *args)
api.chat_prompt = broken
from ponderlm.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_unexpected_exception_is_a_500_of_one_line(run):
    """A handler that raises (a fault injected into the server process) answers 500 in OpenAI's
    shape and logs one line, no traceback; the server goes on serving and stops cleanly."""
    s = Server(run, launch=FAULT)
    try:
        url = f"{s.url}/v1/chat/completions"
        for _ in range(2):
            r = httpx.post(url, json={"model": s.model, "messages": [{"role": "user", "content": "boom"}]})
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
            assert "the server failed on this request" in err["message"] and "injected" not in err["message"]
        assert httpx.get(f"{s.url}/health").json() == {"status": "ok"}
        ok = httpx.post(url, json={"model": s.model, "messages": [{"role": "user", "content": "fine"}],
                                   "max_tokens": 3})  # fmt: skip
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert s.metrics()['ponderlm_http_requests_total{path="/v1/chat/completions",status="500"}'] == 2
    finally:
        assert s.stop() == 0
    err = s.proc.stderr.read()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "injected fault" in line]
    assert len(lines) == 2
    assert all(line.startswith("error: POST /v1/chat/completions failed: RuntimeError") for line in lines)
    assert "with a second line" in lines[0]  # the exception's message, on the same line


def test_a_disconnected_whole_request_is_cancelled(limited):
    """A non-streamed request of 2000 tokens whose client gives up after 0.3 s: the row is dropped
    at once (counted as cancelled, far fewer tokens generated than asked), not run to max_tokens."""
    m0 = limited.wait_metric("ponderlm_batch_rows", 0)
    body = {"model": limited.model, "prompt": "The", "max_tokens": 2000, "ignore_eos": True}
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{limited.url}/v1/completions", json=body, timeout=0.3)
    gave_up = time.monotonic() - t0
    m = limited.wait_metric("ponderlm_batch_rows", 0, timeout=60)
    freed = time.monotonic() - t0

    def delta(key: str) -> float:
        return m.get(key, 0) - m0.get(key, 0)

    assert delta('ponderlm_requests_finished_total{reason="cancelled"}') == 1, m
    assert delta('ponderlm_requests_finished_total{reason="length"}') == 0, m
    generated = delta("ponderlm_generated_tokens_total")
    assert generated < 1000, (generated, gave_up, freed)
    assert m["ponderlm_cache_entries"] == 0


def test_a_stop_string_is_counted_as_stop(server, reference):
    """A request ended by a stop string is told finish_reason "stop" and counted as reason="stop"
    (it was counted as cancelled), streamed or not."""
    text, _ = reference(PROMPTS[0], 60)
    stop = text[len(text) // 3 : len(text) // 3 + 3]
    assert len(text) > 20 and stop.strip()
    m0 = server.wait_metric("ponderlm_batch_rows", 0)
    body = {"prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "stop": [stop]}
    r = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, **body}, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == text[: text.index(stop)]
    chunks = _stream_chunks(server, body)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    m = server.wait_metric("ponderlm_batch_rows", 0)
    for reason, n in (("stop", 2), ("cancelled", 0), ("length", 0)):
        key = f'ponderlm_requests_finished_total{{reason="{reason}"}}'
        assert m.get(key, 0) - m0.get(key, 0) == n, (reason, m)

"""``ponderlm serve`` run the way users run it: a real server process on 127.0.0.1 (a free port),
the official ``openai`` client and httpx as clients, a tiny trained PonderLM-3 made here.

What is checked: greedy output (text and per-token depths) equals ``generate`` on the same prompt
alone while other requests arrive and leave; malformed, unknown, out-of-range and too-long
requests get a 400 in OpenAI's error shape and disturb nothing in flight; a full queue answers 429
with Retry-After; a client that disconnects frees its row and cache; the API key is enforced;
SIGTERM finishes the streams and exits 0.
"""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny PonderLM-3 trained two steps (context 256, a router that varies depths)."""
    from ponderlm.config import load_run_config
    from ponderlm.train import train

    root = tmp_path_factory.mktemp("serve")
    ds = build_fake_dataset(root)
    cfg, explicit = load_run_config(None, [*TINY, "model.max_seq_len=256", "model.method=ponderlm3",
                                           "model.router_init_bias=0.0", f"train.data_dir={ds}",
                                           f"train.out_dir={root / 'p3'}"])  # fmt: skip
    train(cfg, explicit, log=lambda *_: None)
    return root / "p3"


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
    """`python -m ponderlm serve ...` on a free port, until stopped."""

    def __init__(self, run: Path, *args: str, env: dict | None = None) -> None:
        cmd = [sys.executable, "-m", "ponderlm", "serve", "--checkpoint", str(run), "--port", "0", "--tau", TAU, *args]
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


BAD = [  # (body or raw bytes, status, what the message says)
    (b'{"model": "p3", "prompt": ', 400, "not valid JSON"),
    ({"prompt": "The", "max_tokens": 4, "frobnicate": 1}, 400, "unknown field: frobnicate"),
    ({"prompt": "The", "temperature": 7}, 400, "temperature"),
    ({"prompt": "The", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "The", "n": 2}, 400, "n"),
    ({"prompt": "the " * 300, "max_tokens": 4}, 400, "context is 256 tokens"),
    ({"prompt": "The", "max_tokens": 4, "model": "gpt-4"}, 404, "does not exist"),
]


def test_bad_requests_get_openai_errors_and_disturb_nothing(server, reference):
    """While a long stream decodes, every kind of bad request gets its error; the stream's output
    is still generate's."""
    errors = []

    def send_bad() -> None:
        for body, status, says in BAD:
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
    from ponderlm.batching import Token
    from ponderlm.openai_api import CHAT_STOP, Stream, split_at_stop

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

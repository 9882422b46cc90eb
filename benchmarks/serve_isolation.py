"""Do large requests stall the streams in flight? (issue 30, "Large bodies")

Starts ``ponderlm serve`` on one checkpoint (127.0.0.1, a free port) and runs C streaming clients
(closed loop, fixed prompts and lengths, ``ignore_eos``) in turns of two conditions:

* quiet: the C clients alone;
* hostile: the same, while another process sends a maximal request every ``--every`` seconds,
  alternating between a body just under the server's ``--max-body-bytes`` (one long prompt: the
  server parses it, then refuses it by its length in characters) and a prompt of exactly the
  most characters the server tokenizes (context x the longest token; refused after tokenizing,
  since it does not fit the context). Neither reaches the engine: what they cost is the HTTP
  process's.

Measured per condition: the clients' inter-token latency, the gap between a token's arrival and
the previous token's of the same request (tokens that arrive in one chunk: 0), p50/p99/max over
every token, and p99 time to first token; and the ratio hostile / quiet of the ITL p99 within
each pair of turns (the order alternates; the median pair is reported). Goal: <= 1.5. The hostile
process starts with the measured clients and sends its first request ``--every`` seconds later,
so that it meets streams in flight. The hostile requests' answers (status, seconds) are reported
too. The model in docs/PERFORMANCE.md: a d=128 PonderLM-3 of context 1024 trained 2 steps on the
tests' generated corpus (weights near random: enough for latency with ``ignore_eos``), made by
``--make-model DIR`` (it writes DIR/ds and DIR/p3-d128, then benchmarks DIR/p3-d128):

    python benchmarks/serve_isolation.py --make-model runs/serve-isolation --clients 16 --turns 5 --pin \\
        --out benchmarks/results/DATE-cpu-serve-isolation.json

Every loop is bounded in requests and time; the server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import finish, machine, table
from serve_load import OTHER_CPUS, Server, fixed_prompts, pct


def hostile_bodies(model: str, max_body: int, prompt_chars: int, text: str) -> list[bytes]:
    """The two maximal requests: a body of max_body - 64 bytes, and a prompt of prompt_chars characters."""
    head = json.dumps({"model": model, "max_tokens": 1, "prompt": ""})[:-2]  # ... "prompt": "
    fill = max_body - 64 - len(head) - 2
    big = (text * (fill // len(text) + 1))[:fill]
    at_limit = (text * (prompt_chars // len(text) + 1))[:prompt_chars]
    return [json.dumps({"model": model, "max_tokens": 1, "prompt": p}).encode() for p in (big, at_limit)]


def hostile(url: str, bodies: list[bytes], every: float, seconds: float, out) -> None:
    """Another process: one of ``bodies`` (in turn) every ``every`` seconds for ``seconds``, the
    first after ``every`` seconds (when the clients' streams are under way); puts [(bytes, status,
    seconds)] on ``out``."""
    host, port = url.removeprefix("http://").split(":")
    got, t0, i = [], time.monotonic(), 0
    time.sleep(every)
    while time.monotonic() - t0 < seconds and i < 10_000:
        start = time.monotonic()
        body = bodies[i % len(bodies)]
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=60)
            c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            got.append((len(body), r.status, time.monotonic() - start))
            c.close()
        except OSError as e:
            got.append((len(body), type(e).__name__, time.monotonic() - start))
        i += 1
        time.sleep(max(0.0, every - (time.monotonic() - start)))
    out.put(got)


async def stream_one(client, url: str, model: str, prompt: str, max_tokens: int) -> list[float]:
    """One streamed completion: the time it was sent, then each token's arrival time."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    stamps: list[float] = [time.perf_counter()]
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return []
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            for c in json.loads(line[6:]).get("choices", []):
                stamps += [now] * len(c["ponder_depths"])
    return stamps if len(stamps) > 1 else []


async def clients_turn(url: str, model: str, prompts: list[str], clients: int, max_tokens: int,
                       seconds: float, on_start=None) -> dict:  # fmt: skip
    """C closed-loop streaming clients for ``seconds`` (at most 10,000 requests; ``on_start()``
    once their connections are open): every gap between consecutive tokens of a request, every
    time to first token, and the tokens/s."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    gaps: list[float] = []
    ttft: list[float] = []
    tokens = 0
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(stream_one(client, url, model, prompts[0], 2) for _ in range(clients)))  # warm
        if on_start is not None:
            on_start()
        t0, issued = time.perf_counter(), 0

        async def worker() -> None:
            nonlocal issued, tokens
            while time.perf_counter() - t0 < seconds and issued < 10_000:
                issued += 1
                stamps = await stream_one(client, url, model, prompts[issued % len(prompts)], max_tokens)
                if stamps:
                    ttft.append(stamps[1] - stamps[0])
                    gaps.extend(b - a for a, b in itertools.pairwise(stamps[1:]))
                    tokens += len(stamps) - 1

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"gaps": gaps, "ttft": ttft, "tokens": tokens, "tok_s": tokens / wall}


def run_turn(server: Server, args, prompts: list[str], bodies: list[bytes] | None) -> dict:
    proc, out = None, None
    if bodies is not None:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(target=hostile, args=(server.url, bodies, args.every, args.seconds, out), daemon=True)

    def start() -> None:  # the hostile process starts with the measured clients, after their warm-up
        if proc is not None:
            proc.start()
            if args.pin:
                os.sched_setaffinity(proc.pid, OTHER_CPUS)

    r = asyncio.run(clients_turn(server.url, server.model, prompts, args.clients, args.max_tokens, args.seconds,
                                 start))  # fmt: skip
    if proc is not None:
        r["hostile"] = out.get(timeout=120)
        proc.join(timeout=60)
    return r


def summary(turns: list[dict]) -> dict:
    gaps = [g for t in turns for g in t["gaps"]]
    ttft = [x for t in turns for x in t["ttft"]]
    return {"tokens": sum(t["tokens"] for t in turns), "tok_s": statistics.median(t["tok_s"] for t in turns),
            "itl_p50_ms": 1e3 * pct(gaps, 0.5), "itl_p99_ms": 1e3 * pct(gaps, 0.99),
            "itl_max_ms": 1e3 * max(gaps, default=float("nan")), "ttft_p99_ms": 1e3 * pct(ttft, 0.99)}  # fmt: skip


def make_model(root: Path) -> Path:
    """A d=128 PonderLM-3 (2 layers, K=3, context 1024) trained 2 steps on the tests' generated
    corpus, in ``root/p3-d128`` (reused when it is there)."""
    run = root / "p3-d128"
    if (run / "checkpoints").is_dir():
        return run
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from ponderlm.runs.config import load_run_config
    from ponderlm.training.trainer import train

    from fakepkgs import build_fake_dataset

    overrides = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.d_ff=344",
                 "model.max_ponder_steps=3", "model.max_seq_len=1024", "model.method=ponderlm3",
                 "model.router_init_bias=0.0", "train.seq_len=64", "train.batch_size=4", "train.max_steps=2",
                 "train.eval_windows=4", "train.progress=false", f"train.data_dir={build_fake_dataset(root)}",
                 f"train.out_dir={run}"]  # fmt: skip
    cfg, explicit = load_run_config(None, overrides)
    train(cfg, explicit, log=lambda *_: None)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a run or checkpoint to serve")
    src.add_argument("--make-model", type=Path, metavar="DIR",
                     help="train the d=128 PonderLM-3 of docs/PERFORMANCE.md into DIR and serve it")  # fmt: skip
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per streamed request")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens per streaming prompt")
    p.add_argument("--turns", type=int, default=5, help="pairs of turns (quiet, hostile), order alternating")
    p.add_argument("--seconds", type=float, default=8.0, help="length of a turn")
    p.add_argument("--every", type=float, default=1.0, help="seconds between the hostile requests")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="the server's default --max-body-bytes")
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the server")
    p.add_argument("--pin", action="store_true", help="the engine on CPU 0; HTTP and the clients on the others")
    p.add_argument("--label", default="", help="a name for this run in the JSON (e.g. the code version)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.make_model is not None:
        args.checkpoint = str(make_model(args.make_model))

    from ponderlm.loading import load_model

    model, tok, _ = load_model(args.checkpoint)
    # the server's limit (ponderlm.serving.api.longest_token; spelled out so that --label old runs on older code)
    prompt_chars = model.cfg.max_seq_len * max(len(t) for t in tok.tk.get_vocab(with_added_tokens=True))
    del model
    prompts = fixed_prompts(tok, 16, args.prompt_len)
    if args.pin:
        os.sched_setaffinity(0, OTHER_CPUS)
    server = Server(args.checkpoint, args)  # its default --max-body-bytes
    bodies = hostile_bodies(server.model, args.max_body_bytes, prompt_chars, prompts[0] + " ")
    quiet, loud, ratios = [], [], []
    try:
        for turn in range(args.turns):
            order = ("quiet", "hostile") if turn % 2 == 0 else ("hostile", "quiet")
            got = {}
            for cond in order:
                got[cond] = run_turn(server, args, prompts, bodies if cond == "hostile" else None)
            quiet.append(got["quiet"])
            loud.append(got["hostile"])
            q, h = summary([got["quiet"]]), summary([got["hostile"]])
            ratios.append(h["itl_p99_ms"] / q["itl_p99_ms"])
            answers = sorted({str(s) for _, s, _ in got["hostile"]["hostile"]})
            print(f"turn {turn}: p99 quiet {q['itl_p99_ms']:.1f} ms, hostile {h['itl_p99_ms']:.1f} ms "
                  f"(ratio {ratios[-1]:.2f}); hostile answers {answers}", flush=True)  # fmt: skip
    finally:
        server.stop()
    rows = [{"condition": name, **summary(turns)} for name, turns in (("quiet", quiet), ("hostile", loud))]
    print(table(rows, [("condition", "condition", "s"), ("tok_s", "tok/s", ".0f"), ("itl_p50_ms", "ITL p50 ms", ".1f"),
                       ("itl_p99_ms", "ITL p99 ms", ".1f"), ("itl_max_ms", "ITL max ms", ".0f"),
                       ("ttft_p99_ms", "TTFT p99 ms", ".0f")]))  # fmt: skip
    sent = [x for t in loud for x in t["hostile"]]
    by_size = {}
    for size, status, secs in sent:
        by_size.setdefault(size, []).append((status, secs))
    for size, got in sorted(by_size.items()):
        print(f"hostile body {size} bytes: {len(got)} sent, answers {sorted({str(s) for s, _ in got})}, "
              f"median {statistics.median(s for _, s in got):.3f} s")  # fmt: skip
    result = {
        "benchmark": "serve_isolation", "machine": machine(), "checkpoint": args.checkpoint,
        "clients": args.clients, "max_tokens": args.max_tokens, "turns": args.turns, "seconds": args.seconds,
        "every": args.every, "max_body_bytes": args.max_body_bytes, "prompt_chars": prompt_chars,
        "pin": args.pin, "label": args.label,
        "quiet": summary(quiet), "hostile": summary(loud), "ratio_p99_turns": ratios,
        "ratio_p99_median": statistics.median(ratios), "goal": 1.5,
        "hostile_requests": {str(k): {"sent": len(v), "answers": sorted({str(s) for s, _ in v}),
                                      "median_s": statistics.median(s for _, s in v)} for k, v in by_size.items()},
    }  # fmt: skip
    print(f"median ratio of p99 inter-token latency, hostile / quiet: {result['ratio_p99_median']:.2f} (goal <= 1.5)")
    finish(result, args.out)


if __name__ == "__main__":
    main()

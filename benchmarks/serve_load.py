"""Serving under load: does the depth the router saves become requests per second?

Starts ``ponderlm serve`` for every checkpoint as a subprocess on 127.0.0.1 (free ports), and
drives each with C concurrent streaming clients (closed loop: each sends its next request when
the last one ends), fixed prompts and fixed lengths (``ignore_eos``), a bounded number of
requests and a bounded time per turn. The models take turns (``--turns``, the order rotating),
so a drift in the machine's speed moves them alike. Reported per (model, clients): generated
tokens/s (median turn), p50/p99 time to first token and per-token latency (a request's mean gap
between tokens after its first; over every request of every turn), mean depth and FLOPs per
generated token (from the responses' ``ponder_depths`` and ``usage``). Then:

* PonderLM-3 against PonderLM-2 (the runs named by --p3 and --p2): the throughput ratio at each
  client count (median over turns of the ratio within a turn), the ideal ratio its FLOPs per token
  predict, and their quotient (goal >= 0.85 at 16 clients);
* the server's overhead: one wave of --batch requests sent at once against in-process
  ``generate`` on the same prompts as one batch, in turns (medians; one torch thread each,
  prompts included in both; goal <= 10%), with the server's computation (``prefill="exact"``:
  prompts walked slot by slot, as the server walks them) and with generate's default prefill.

    python benchmarks/serve_load.py --checkpoints runs/cpu_text/vanilla runs/cpu_text/p2-k3 \\
        runs/cpu_text/p3-k3-l0.05 --tau 0.05 --out serve-load.json

A checkpoint written ``RUN@TAU`` is served at that tau (its name in the tables is ``NAME@TAU``), so
one PonderLM-3 run can be measured at several operating points beside one PonderLM-2; ``--p3``
takes several names, each compared with ``--p2``. ``--no-overhead`` skips the waves.

``--soak SECONDS`` instead floods the first checkpoint's server beyond its queue for that long
and reports the server's resident memory and cache entries after a warm-up and after the soak.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import finish, machine, table

PASSAGE = (
    "The history of the country is the history of its people, of the laws they made and the wars they fought, "
    "of the towns they built along the rivers and the roads that joined them. In the first years of the century "
    "the government spent more on schools than on ships, and the number of children who could read rose every "
    "year. Trade with the old world grew as well, and with it the wealth of the ports. Yet the land itself "
    "remained the heart of the nation: most men still worked on farms, and the price of wheat decided whether a "
    "family would eat well in winter or sell the cow before spring. "
) * 4


# --pin: the CPUs of the model's computation (the engine process, in-process generate) and of the rest
MODEL_CPUS = {0}
OTHER_CPUS = set(range(1, os.cpu_count() or 1)) or {0}


def fixed_prompts(tok, n: int, length: int) -> list[str]:
    """n prompts of about ``length`` tokens: windows of one fixed passage, the same for every model
    that shares the tokenizer."""
    ids = tok.encode(PASSAGE)
    step = max(1, (len(ids) - length) // max(n, 1))
    return [tok.decode(ids[i * step : i * step + length]) for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def split_spec(spec: str, tau: float | None) -> tuple[str, str, float | None]:
    """``RUN`` or ``RUN@TAU`` -> (name in the tables, checkpoint, tau: TAU, else --tau)."""
    ck, at, t = spec.partition("@")
    name = Path(ck).name + (f"@{t}" if at else "")
    return name, ck, float(t) if at else tau


class Server:
    def __init__(self, checkpoint: str, args, tau: float | None = None) -> None:
        cmd = [sys.executable, "-m", "ponderlm", "serve", "--checkpoint", checkpoint, "--host", "127.0.0.1",
               "--port", "0", "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]  # fmt: skip
        tau = args.tau if tau is None else tau
        if tau is not None:
            cmd += ["--tau", str(tau)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if args.code is not None:  # the servers run another copy of ponderlm (a baseline's)
            env["PYTHONPATH"] = str(args.code)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.search(r"^serving (\S+) .* on (http://127\.0\.0\.1:\d+)", line)
        if not m:
            raise SystemExit(f"the server did not start: {line!r}")
        self.model, self.url = m.group(1), m.group(2)
        if args.pin:  # the model's process gets core 0 to itself; HTTP (and this client) share the rest
            pid = self.proc.pid
            for kid in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                if b"spawn_main" in Path(f"/proc/{kid}/cmdline").read_bytes():
                    os.sched_setaffinity(int(kid), MODEL_CPUS)
            os.sched_setaffinity(pid, OTHER_CPUS)

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of the server process and of its engine process (its children), MB."""

        def rss(pid: int) -> float:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) / 1024
            return float("nan")

        pid = self.proc.pid
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return {"server": rss(pid), "engine": sum(rss(k) for k in kids)}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


async def one_request(client, server: Server, prompt: str, max_tokens: int) -> dict | None:
    """A streamed completion; returns its timings, depths and usage (None on a refusal)."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    stamps, depths, usage = [], [], None
    async with client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if ch.get("usage"):
                usage = ch["usage"]
            for c in ch.get("choices", []):
                now = time.perf_counter()
                stamps += [now] * len(c["ponder_depths"])
                depths += c["ponder_depths"]
    # per-token latency: the mean gap between this request's tokens after the first (TPOT)
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "tpot": tpot, "depths": depths, "usage": usage,
            "end": time.perf_counter()}  # fmt: skip


async def load(server: Server, prompts: list[str], clients: int, requests: int, max_tokens: int,
               time_limit: float, warm: int = 0) -> dict:  # fmt: skip
    """C closed-loop clients, ``requests`` requests in all or until ``time_limit`` seconds. With
    ``warm``, that many requests first open the client's connections (not counted), as a client
    that has talked to the server before keeps them open."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        if warm:
            await asyncio.gather(*(one_request(client, server, prompts[0], 1) for _ in range(warm)))
        issued = 0
        done: list[dict] = []
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() - t0 < time_limit:
                i = issued
                issued += 1
                r = await one_request(client, server, prompts[i % len(prompts)], max_tokens)
                if r is not None:
                    done.append(r)

        await asyncio.gather(*(worker() for _ in range(clients)))
    wall = (max(r["end"] for r in done) if done else time.perf_counter()) - t0
    tokens = sum(len(r["depths"]) for r in done)
    depths = [d for r in done for d in r["depths"]]
    tpot = [r["tpot"] for r in done]
    comp_flops = sum(r["usage"]["completion_flops"] for r in done if r["usage"])
    return {"clients": clients, "requests": len(done), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_ms": 1e3 * pct([r["ttft"] for r in done], 0.5),
            "ttft_p99_ms": 1e3 * pct([r["ttft"] for r in done], 0.99),
            "tpot_p50_ms": 1e3 * pct(tpot, 0.5), "tpot_p99_ms": 1e3 * pct(tpot, 0.99),
            "mean_depth": statistics.fmean(depths) if depths else float("nan"),
            "flops_per_token": comp_flops / tokens if tokens else float("nan"),
            "ttft": [r["ttft"] for r in done], "tpot": tpot, "completion_flops": comp_flops,
            "depths": depths}  # fmt: skip


def pooled(runs: list[dict]) -> dict:
    """One row from a model's turns at one client count: the median turn's tokens/s, latency
    percentiles over every request of every turn, depth and FLOPs over every token."""
    ttft = [x for r in runs for x in r["ttft"]]
    tpot = [x for r in runs for x in r["tpot"]]
    depths = [d for r in runs for d in r["depths"]]
    tokens = sum(r["tokens"] for r in runs)
    return {"clients": runs[0]["clients"], "turns": len(runs), "requests": sum(r["requests"] for r in runs),
            "tokens": tokens, "tok_s": statistics.median(r["tok_s"] for r in runs),
            "tok_s_turns": [r["tok_s"] for r in runs],
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "tpot_p50_ms": 1e3 * pct(tpot, 0.5), "tpot_p99_ms": 1e3 * pct(tpot, 0.99),
            "mean_depth": statistics.fmean(depths) if depths else float("nan"),
            "flops_per_token": sum(r["completion_flops"] for r in runs) / max(tokens, 1)}  # fmt: skip


class InProcess:
    """``generate`` in this process on the prompts as one left-padded batch (its default schedule)."""

    def __init__(self, checkpoint: str, prompts: list[str], max_tokens: int, tau: float | None, threads: int) -> None:
        import torch

        from ponderlm.loading import load_model

        torch.set_num_threads(threads)
        self.model, tok, _ = load_model(checkpoint)
        enc = [tok.encode(p) for p in prompts]
        T = max(len(e) for e in enc)
        self.ids = torch.tensor([[0] * (T - len(e)) + e for e in enc])
        self.mask = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in enc])
        self.max_tokens, self.tau = max_tokens, tau
        self.tok_s("exact")  # warm-up

    def tok_s(self, prefill: str, pin: bool = False) -> float:
        """One generate call's tokens/s (on the model's CPUs with ``pin``, as the engine runs)."""
        if pin:
            os.sched_setaffinity(0, MODEL_CPUS)
        try:
            t0 = time.perf_counter()
            self.model.generate(self.ids, self.max_tokens, attention_mask=self.mask, tau=self.tau, prefill=prefill)
            return self.ids.shape[0] * self.max_tokens / (time.perf_counter() - t0)
        finally:
            if pin:
                os.sched_setaffinity(0, OTHER_CPUS)


async def _raw_response(reader) -> bytes:
    """One chunked HTTP response, read whole (headers and body) without parsing it on the way."""
    buf = b""
    while not buf.endswith(b"\r\n0\r\n\r\n"):
        data = await reader.read(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection mid-response")
        buf += data
    return buf


async def _raw_wave(server: Server, prompts: list[str], max_tokens: int) -> float:
    import urllib.parse

    url = urllib.parse.urlsplit(server.url)

    def request(prompt: str, n: int) -> bytes:
        body = json.dumps({"model": server.model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                           "stream": True, "ignore_eos": True}).encode()  # fmt: skip
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        return head.encode() + body

    conns = [await asyncio.open_connection(url.hostname, url.port) for _ in prompts]
    for (r, w), p in zip(conns, prompts, strict=True):  # open and warm every connection
        w.write(request(p, 1))
        await _raw_response(r)
    wire = [request(p, max_tokens) for p in prompts]
    t0 = time.perf_counter()
    for (_, w), b in zip(conns, wire, strict=True):
        w.write(b)
    bodies = await asyncio.gather(*(_raw_response(r) for r, _ in conns))
    wall = time.perf_counter() - t0
    for _, w in conns:
        w.close()
    tokens = 0
    for body in bodies:  # parsed after the clock stopped: the depths of every chunk
        for line in body.split(b"\n"):
            if line.startswith(b"data: {"):
                tokens += sum(len(c.get("ponder_depths", [])) for c in json.loads(line[6:]).get("choices", []))
    if tokens != len(prompts) * max_tokens:
        raise SystemExit(f"a wave returned {tokens} tokens, expected {len(prompts) * max_tokens}")
    return tokens / wall


def wave(server: Server, prompts: list[str], max_tokens: int) -> float:
    """Generated tokens/s of the server for one wave of len(prompts) streamed requests sent at
    once over connections already open. The client writes prebuilt requests and reads the
    responses as raw bytes, parsing them only after the clock stops: a Python HTTP client that
    parses every chunk on this machine's second core delayed the later requests of a wave by tens
    of milliseconds, which is the client's cost, not the server's."""
    return asyncio.run(_raw_wave(server, prompts, max_tokens))


def soak(args) -> dict:
    """Flood one server beyond its queue for --soak seconds; memory and cache entries after."""
    import httpx

    server = Server(args.checkpoints[0], args)
    try:
        from ponderlm.loading import load_model

        _, tok, _ = load_model(args.checkpoints[0])
        prompts = fixed_prompts(tok, 16, args.prompt_len)
        clients = args.max_batch + args.max_queue + 8  # more than the server takes: some get 429

        def metrics() -> dict:
            text = httpx.get(f"{server.url}/metrics").text
            m = {k: float(v) for k, v in re.findall(r"^(\w+) (\S+)$", text, flags=re.M)}
            refused = re.search(r'^ponderlm_http_requests_total\{path="/v1/completions",status="429"\} (\S+)$', text,
                                flags=re.M)  # fmt: skip
            return {**m, "refused_429": float(refused.group(1)) if refused else 0.0}

        asyncio.run(load(server, prompts, clients, 10**9, args.max_tokens, min(30.0, args.soak / 4)))  # warm-up
        before = {**{f"rss_mb_{k}": v for k, v in server.rss_mb().items()}, **metrics()}
        asyncio.run(load(server, prompts, clients, 10**9, args.max_tokens, args.soak))
        time.sleep(1.0)
        after = {**{f"rss_mb_{k}": v for k, v in server.rss_mb().items()}, **metrics()}
        code = server.stop()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    keys = [
        "rss_mb_server",
        "rss_mb_engine",
        "ponderlm_cache_entries",
        "ponderlm_batch_rows",
        "ponderlm_queue_length",
        "refused_429",
    ]
    return {"soak_s": args.soak, "clients": clients, "before": {k: before.get(k) for k in keys},
            "after": {k: after.get(k) for k in keys}, "exit_status": code,
            "generated_tokens": after.get("ponderlm_generated_tokens_total")}  # fmt: skip


def measure(args) -> tuple[list[dict], dict, dict]:
    """The load turns and the overhead waves: (rows, turns by (model, clients), overhead)."""
    from ponderlm.loading import load_model

    specs = [split_spec(s, args.tau) for s in args.checkpoints]
    names = [name for name, _, _ in specs]
    servers: dict[str, Server] = {}
    try:
        for name, ck, tau in specs:  # all up at once; an idle one costs nothing
            servers[name] = Server(ck, args, tau)
        _, tok, _ = load_model(specs[0][1])
        prompts = fixed_prompts(tok, max(args.batch, 16), args.prompt_len)
        for s in servers.values():
            asyncio.run(load(s, prompts, 2, 2, 8, 60))  # warm-up
        # the models take turns (the order rotating), so a drift in the machine's speed moves every
        # model alike; the P3/P2 ratio is taken within each turn, then the median
        turns: dict[tuple[str, int], list[dict]] = {}
        for c in args.clients:
            for t in range(args.turns):
                for name in names[t % len(names) :] + names[: t % len(names)]:
                    n = max(args.requests, 8 * c)
                    r = asyncio.run(load(servers[name], prompts, c, n, args.max_tokens, args.time_limit))
                    turns.setdefault((name, c), []).append(r)
                    print(f"{name} clients={c} turn {t + 1}: {r['tok_s']:.1f} tok/s", file=sys.stderr)
        rows = [{"model": name, **pooled(turns[(name, c)])} for c in args.clients for name in names]
        if not args.overhead:
            return rows, turns, {}
        # the overhead: a wave of --batch requests against in-process generate on the same prompts
        # as one batch, in turns (the idle servers stay up and cost nothing meanwhile)
        local = {name: InProcess(ck, prompts[: args.batch], args.max_tokens, tau, args.threads)
                 for name, ck, tau in specs}  # fmt: skip
        waves = {name: {"served": [], "exact": [], "default": []} for name in names}
        for _ in range(3 * args.turns):  # a wave lasts under a second: more turns
            for name in names:
                waves[name]["served"].append(wave(servers[name], prompts[: args.batch], args.max_tokens))
                waves[name]["exact"].append(local[name].tok_s("exact", args.pin))
                waves[name]["default"].append(local[name].tok_s("auto", args.pin))
    finally:
        for s in servers.values():
            s.stop()
    overhead = {}
    for name in names:
        served, ex, de = (statistics.median(waves[name][k]) for k in ("served", "exact", "default"))
        overhead[name] = {"served_tok_s": served, "generate_exact_tok_s": ex, "overhead_exact": 1 - served / ex,
                          "generate_default_tok_s": de, "overhead_default": 1 - served / de,
                          "turns": waves[name]}  # fmt: skip
    return rows, turns, overhead


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="runs to serve, one after another")
    p.add_argument("--p2", default="p2-k3", help="name of the PonderLM-2 run (directory name)")
    p.add_argument("--p3", nargs="+", default=["p3-k3-l0.05"],
                   help="names of the PonderLM-3 runs (directory name, NAME@TAU for RUN@TAU)")  # fmt: skip
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32,
                   help="requests per turn of a model at a client level (at least 8 per client)")  # fmt: skip
    p.add_argument("--turns", type=int, default=5, help="turns per model and client level (medians reported)")
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds per turn: no new request after")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="the wave compared with in-process generate")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads, server and in-process alike")
    p.add_argument("--soak", type=float, default=0.0, help="seconds of soak instead of the load table")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the model's process to CPU 0 and the server and clients to the others "
                        "(pinning is the default with 2 or more CPUs)")  # fmt: skip
    p.add_argument(
        "--code",
        type=Path,
        default=None,
        help="a directory holding another copy of the ponderlm package: the servers run that one",
    )
    p.add_argument("--no-overhead", dest="overhead", action="store_false",
                   help="skip the server-overhead waves against in-process generate")  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.pin = args.pin and (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
    if args.pin:
        os.sched_setaffinity(0, OTHER_CPUS)  # the clients
    if args.soak:
        res = soak(args)
        print(json.dumps(res, indent=2))
        finish({"benchmark": "serve_soak", "machine": machine(), **res}, args.out)
        return
    rows, turns, overhead = measure(args)
    cols = [("model", "model", "s"), ("clients", "clients", "d"), ("requests", "requests", "d"),
            ("tok_s", "tokens/s", ".1f"), ("ttft_p50_ms", "TTFT p50 ms", ".0f"), ("ttft_p99_ms", "TTFT p99 ms", ".0f"),
            ("tpot_p50_ms", "per-token p50 ms", ".1f"), ("tpot_p99_ms", "per-token p99 ms", ".1f"),
            ("mean_depth", "mean depth", ".2f"), ("flops_per_token", "MFLOPs/token", ".3g")]  # fmt: skip
    shown = [{**r, "flops_per_token": r["flops_per_token"] / 1e6} for r in rows]
    print(table(shown, cols))
    vs = []
    by = {(r["model"], r["clients"]): r for r in rows}
    for name in args.p3:
        for c in args.clients:
            p3, p2 = by.get((name, c)), by.get((args.p2, c))
            if p3 and p2:
                per_turn = [a["tok_s"] / b["tok_s"] for a, b in zip(turns[(name, c)], turns[(args.p2, c)], strict=True)]
                real, ideal = statistics.median(per_turn), p2["flops_per_token"] / p3["flops_per_token"]
                vs.append({"p3": name, "clients": c, "mean_depth": p3["mean_depth"], "realised": real,
                           "realised_turns": per_turn, "ideal": ideal, "fraction": real / ideal,
                           "fraction_turns": [r / ideal for r in per_turn]})  # fmt: skip
    if vs:
        print()
        print(table(vs, [("p3", "PonderLM-3", "s"), ("clients", "clients", "d"), ("mean_depth", "mean depth", ".2f"),
                         ("realised", "P3/P2 tokens/s", ".3f"), ("ideal", "ideal (FLOPs)", ".3f"),
                         ("fraction", "fraction of ideal", ".2f")]))  # fmt: skip
    ov = [{"model": k, **v} for k, v in overhead.items()]
    if ov:
        print()
        print(table(ov, [("model", "model", "s"), ("served_tok_s", f"server, {args.batch} at once, tok/s", ".1f"),
                         ("generate_exact_tok_s", "generate, exact prefill, tok/s", ".1f"),
                         ("overhead_exact", "overhead", ".1%"),
                         ("generate_default_tok_s", "generate, default prefill, tok/s", ".1f"),
                         ("overhead_default", "overhead", ".1%")]))  # fmt: skip
    settings = {k: getattr(args, k) for k in ("checkpoints", "p2", "p3", "clients", "requests", "turns", "time_limit",
                                              "prompt_len", "max_tokens", "batch", "max_batch", "max_queue", "tau",
                                              "threads", "pin", "overhead", "code")}  # fmt: skip
    settings["code"] = str(settings["code"]) if settings["code"] else None
    finish({"benchmark": "serve_load", "machine": machine(), "settings": settings, "rows": rows, "p3_vs_p2": vs,
            "overhead": overhead}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()

"""How ``ponderlm serve`` should compute prompts: walk them through the batch, or prefill each alone?

In-process (no HTTP), the continuous-batching scheduler (:mod:`ponderlm.serving.scheduler`) runs a closed
loop: C rows kept busy, each request a fixed prompt of T tokens and ``--max-tokens`` generated
tokens (EOS ignored), for ``--requests`` requests. For each prompt length and each way of
computing prompts it reports generated tokens/s and the time to the first token (from submission),
side by side in one run:

* ``exact``: the prompt walks through the batch, one slot per step like every other row;
* ``converged``: the prompt is prefilled when admitted (Jacobi passes until the latents settle;
  together with the others admitted at that step), while the other rows wait.

    taskset -c 0 python benchmarks/serve_prefill.py --checkpoints runs/cpu_text/p2-k3 \\
        runs/cpu_text/p3-k3-l0.05 --tau 0.05 --lengths 16 64 128 192 --out prefill.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import finish, machine, table
from serve_load import PASSAGE, pct


def closed_loop(model, eos, prompts: list[list[int]], how: str, rows: int, requests: int, max_tokens: int,
                tau: float | None) -> dict:  # fmt: skip
    from ponderlm.serving.scheduler import BatchSettings, Request, Scheduler, Token

    sched = Scheduler(model, eos, BatchSettings(max_batch=rows, max_queue=rows, tau=tau, prefill=how))
    sent: dict[int, float] = {}
    first: dict[int, float] = {}

    def submit(i: int) -> None:
        def on_event(ev, i=i) -> None:
            if isinstance(ev, Token) and i not in first:
                first[i] = time.perf_counter()

        sent[i] = time.perf_counter()
        sched.submit(Request(prompts[i % len(prompts)], max_tokens, ignore_eos=True, on_event=on_event))

    n = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        while n < min(rows, requests):
            submit(n)
            n += 1
        while sched.rows or not sched.queue.empty():
            sched.step()
            while len(sched.rows) + sched.queue.qsize() < rows and n < requests:
                submit(n)
                n += 1
    wall = time.perf_counter() - t0
    ttft = [first[i] - sent[i] for i in first]
    return {"tok_s": sched.stats.tokens / wall, "ttft_p50_ms": 1e3 * pct(ttft, 0.5),
            "ttft_p99_ms": 1e3 * pct(ttft, 0.99), "steps": sched.stats.steps, "wall_s": wall,
            "mean_depth": sched.stats.depth_sum / max(sched.stats.tokens, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 128, 192], help="prompt lengths (tokens)")
    p.add_argument("--rows", type=int, default=16, help="requests decoding at once")
    p.add_argument("--requests", type=int, default=48, help="requests per (model, length, mode)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from ponderlm.loading import load_model

    rows = []
    for ck in args.checkpoints:
        model, tok, _ = load_model(ck)
        ids = tok.encode(PASSAGE * 2)
        for T in args.lengths:
            if len(ids) < T + 16:
                raise SystemExit(f"the passage has {len(ids)} tokens, too few for prompts of {T}")
            prompts = [ids[i * 7 : i * 7 + T] for i in range(16)]  # 16 distinct windows
            for how in ("exact", "converged"):
                r = closed_loop(model, tok.eot_id, prompts, how, args.rows, args.requests, args.max_tokens, args.tau)
                rows.append({"model": Path(ck).name, "prompt": T, "prefill": how, **r})
                print(f"{Path(ck).name} T={T} {how}: {r['tok_s']:.0f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms",
                      file=sys.stderr)  # fmt: skip
    print(table(rows, [("model", "model", "s"), ("prompt", "prompt tokens", "d"), ("prefill", "prompts", "s"),
                       ("tok_s", "tokens/s", ".0f"), ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
                       ("ttft_p99_ms", "TTFT p99 ms", ".0f"), ("mean_depth", "mean depth", ".2f")]))  # fmt: skip
    ratios = []
    by = {(r["model"], r["prompt"], r["prefill"]): r for r in rows}
    for (m, T, how), r in by.items():
        if how == "exact":
            c = by[(m, T, "converged")]
            ratios.append({"model": m, "prompt": T, "tok_s": r["tok_s"] / c["tok_s"],
                           "ttft": r["ttft_p50_ms"] / c["ttft_p50_ms"]})  # fmt: skip
    print()
    print(table(ratios, [("model", "model", "s"), ("prompt", "prompt tokens", "d"),
                         ("tok_s", "walk / prefill: tokens/s", ".2f"),
                         ("ttft", "walk / prefill: TTFT p50", ".2f")]))  # fmt: skip
    settings = {k: getattr(args, k) for k in ("lengths", "rows", "requests", "max_tokens", "tau", "threads")}
    finish(
        {"benchmark": "serve_prefill", "machine": machine(), "settings": settings, "rows": rows, "ratios": ratios},
        args.out,
    )


if __name__ == "__main__":
    main()

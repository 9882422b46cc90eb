"""The fixed cost of a serving step, in process: the scheduler (no HTTP, no engine pipe) kept at
``--rows`` busy rows of closed-loop requests (16-token prompts, 64 tokens with ``ignore_eos``), its
tokens per second and per CPU second, time per step, and optionally cProfile's top functions.

    git show 8966f61:ponderlm/serving/scheduler.py > /tmp/scheduler_before.py
    OMP_NUM_THREADS=1 python benchmarks/serve_step_profile.py --checkpoints runs/serve_depth/p2-k3 \\
        runs/serve_depth/p3-l0.2@0.012 runs/serve_depth/p3-l0.2@0.003 --baseline /tmp/scheduler_before.py \\
        --seconds 0.4 --turns 18 --split

``RUN@TAU`` serves RUN at that tau; ``random:METHOD[@TAU]`` is a random d=128 model of that method
(4 layers, vocabulary 1,024), for profiling without a trained run. The models (and, with
``--baseline``, each one again under an earlier scheduler.py) keep their batches and take short
turns, so a drift in the machine's speed moves them alike; figures are totals over every turn, and
per-step CPU time and tokens per CPU second against the first model's within each turn (medians).
``--split`` times ``recurrence.advance_slots`` (the model's slot step) apart from the rest of a step.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import PASSAGE

from ponderlm.serving.scheduler import BatchSettings, Request, Scheduler


def load(spec: str):
    """(name, model, tokens of the passage, tau) for ``RUN@TAU``, ``RUN`` or ``random:METHOD``."""
    path, _, tau = spec.partition("@")
    if path.startswith("random:"):
        from ponderlm.model.config import ModelConfig
        from ponderlm.model.model import PonderLM

        method = path.split(":", 1)[1]
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, d_ff=344, max_seq_len=256,
                          max_ponder_steps=3, method=method, router_init_bias=2.0)  # fmt: skip
        model = PonderLM(cfg).eval()
        ids = torch.randint(1, 1024, (600,)).tolist()
    else:
        from ponderlm.loading import load_model

        model, tok, _ = load_model(path)
        ids = tok.encode(PASSAGE)
    return spec, model, ids, float(tau) if tau else None


class ModelClock:
    """Time spent inside :func:`recurrence.advance_slots` (the model's slot step), the rest of a
    scheduler step being the scheduler's own cost."""

    def __init__(self) -> None:
        from ponderlm.model import recurrence

        self.mod, self.inner, self.total = recurrence, recurrence.advance_slots, 0.0

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return self.inner(*a, **k)
            finally:
                self.total += time.perf_counter() - t0

        recurrence.advance_slots = timed


CLOCK: ModelClock | None = None


def scheduler_class(path: str | None):
    """The Scheduler of this checkout, or the one defined in the file ``path`` (a copy of an earlier
    ponderlm/serving/scheduler.py: the baseline of a before/after comparison)."""
    if path is None:
        return Scheduler
    import importlib.util

    spec = importlib.util.spec_from_file_location("scheduler_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scheduler_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod.Scheduler


class Loop:
    """One scheduler kept busy in a closed loop (every finished request replaced at once), stepped a
    slice at a time so that several models can take turns finely; counts accumulate over slices."""

    def __init__(self, model, ids, tau, rows: int, prompt_len: int, max_tokens: int, cls=Scheduler) -> None:
        self.sched = cls(model, None, BatchSettings(max_batch=rows, max_queue=4 * rows, tau=tau))
        self.windows = [ids[i * max(1, (len(ids) - prompt_len) // 16) :][:prompt_len] for i in range(16)]
        self.max_tokens, self.n = max_tokens, 0
        self.tokens = self.depth_sum = self.steps = 0
        self.wall = self.cpu = self.model_s = 0.0
        for _ in range(rows):
            self.submit()
        for _ in range(50):  # warm-up: the batch full, prompts walking, first tokens out
            self.sched.step()
        self.tokens = self.depth_sum = 0

    def submit(self) -> None:
        prompt = self.windows[self.n % 16]
        self.n += 1
        self.sched.submit(Request(prompt, self.max_tokens, ignore_eos=True, on_event=self.on_event))

    def on_event(self, ev) -> None:
        if hasattr(ev, "reason"):  # Finished (duck-typed: a baseline's module has classes of its own)
            self.submit()
        elif hasattr(ev, "depth"):  # Token
            self.tokens += 1
            self.depth_sum += ev.depth

    def go(self, seconds: float) -> dict:
        """Step for ``seconds``; returns this slice's figures (and adds them to the totals)."""
        tok0, dep0, st0 = self.tokens, self.depth_sum, self.sched.stats.steps
        m0 = CLOCK.total if CLOCK else 0.0
        t0, c0 = time.perf_counter(), time.thread_time()
        while time.perf_counter() - t0 < seconds:
            self.sched.step()
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        model_s = (CLOCK.total - m0) if CLOCK else float("nan")
        steps, tokens = self.sched.stats.steps - st0, self.tokens - tok0
        self.wall, self.cpu, self.model_s, self.steps = (
            self.wall + wall,
            self.cpu + cpu,
            self.model_s + model_s,
            self.steps + steps,
        )
        return figures(tokens, self.depth_sum - dep0, steps, wall, cpu, model_s)

    def totals(self) -> dict:
        return figures(self.tokens, self.depth_sum, self.steps, self.wall, self.cpu, self.model_s)


def figures(tokens: int, depth_sum: int, steps: int, wall: float, cpu: float, model_s: float) -> dict:
    steps = max(steps, 1)
    return {"tok_s": tokens / wall, "cpu_tok_s": tokens / cpu, "ms_per_step": 1e3 * wall / steps,
            "cpu_ms_per_step": 1e3 * cpu / steps, "model_ms_per_step": 1e3 * model_s / steps,
            "rest_ms_per_step": 1e3 * (wall - model_s) / steps, "tokens_per_step": tokens / steps,
            "mean_depth": depth_sum / max(tokens, 1), "steps": steps}  # fmt: skip


def run(model, ids, tau, rows: int, seconds: float, prompt_len: int, max_tokens: int, cls=Scheduler) -> dict:
    """A fresh closed loop stepped for ``seconds``."""
    return Loop(model, ids, tau, rows, prompt_len, max_tokens, cls).go(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="RUN, RUN@TAU or random:METHOD[@TAU]")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--verbose", action="store_true", help="print every turn")
    p.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions per model")
    p.add_argument(
        "--baseline",
        default=None,
        help="a copy of an earlier scheduler.py: each model also runs with its Scheduler, in turns",
    )
    p.add_argument("--split", action="store_true", help="also time advance_slots apart from the rest of a step")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    global CLOCK
    if args.split:
        CLOCK = ModelClock()
    models = [load(s) for s in args.checkpoints]
    codes = {"": Scheduler} if args.baseline is None else {"": Scheduler, " (before)": scheduler_class(args.baseline)}
    jobs = [(name + tag, model, ids, tau, cls) for name, model, ids, tau in models for tag, cls in codes.items()]
    res: dict[str, list[dict]] = {j[0]: [] for j in jobs}
    loops = {name: Loop(model, ids, tau, args.rows, args.prompt_len, args.max_tokens, cls)
             for name, model, ids, tau, cls in jobs}  # fmt: skip
    for t in range(args.turns):  # the models take turns (short turns: finely interleaved)
        for name, *_ in jobs[t % len(jobs) :] + jobs[: t % len(jobs)]:
            r = loops[name].go(args.seconds)
            res[name].append(r)
            if args.verbose:
                print(f"{name} turn {t + 1}: {json.dumps({k: round(v, 3) for k, v in r.items()})}", file=sys.stderr)
    summary = {name: loop.totals() for name, loop in loops.items()}  # over every turn
    for name, r in summary.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    first = jobs[0][0]
    for name in summary:  # per-step cost against the first model's, within each turn (medians)
        ratio = [a["cpu_ms_per_step"] / b["cpu_ms_per_step"] for a, b in zip(res[name], res[first], strict=True)]
        summary[name]["cpu_step_vs_first_median"] = statistics.median(ratio)
        tok = [a["cpu_tok_s"] / b["cpu_tok_s"] for a, b in zip(res[name], res[first], strict=True)]
        summary[name]["cpu_tok_s_vs_first_median"] = statistics.median(tok)
        print(f"{name}: per-step CPU time / {first}'s {statistics.median(ratio):.3f}, "
              f"tokens per CPU second / {first}'s {statistics.median(tok):.3f} (medians over turns)")  # fmt: skip
    if args.profile:
        for name, model, ids, tau in models:
            prof = cProfile.Profile()
            prof.enable()
            run(model, ids, tau, args.rows, args.seconds, args.prompt_len, args.max_tokens)
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.profile)
            print(f"=== {name}\n{s.getvalue()}")
    if args.out:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "turns": res,
                                        "summary": summary}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

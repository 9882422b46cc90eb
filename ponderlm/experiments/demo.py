"""A two-minute, CPU-only tour of the three methods on real English text that ships with Python.

Trains tiny character-level vanilla, PonderLM-2 and PonderLM-3 models on the docstrings of the
standard library, then reports for each: validation loss in the exact (inference) recurrence at
several tau, realised mean depth, inference FLOPs per token, and the gap between the Jacobi
(training) computation and the exact one. The real pretraining pipeline is ``ponderlm train``.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass

import torch

from ponderlm.model import flops
from ponderlm.model.config import ModelConfig
from ponderlm.model.losses import ponder_loss
from ponderlm.model.model import PonderLM
from ponderlm.training.schedule import jacobi_iters_at

STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses "
    "datetime decimal difflib email enum fractions ftplib functools getopt gettext glob gzip "
    "hashlib heapq hmac html http imaplib inspect io ipaddress itertools json locale logging "
    "mailbox mimetypes numbers operator optparse os pathlib pickle pprint queue random re "
    "sched secrets shelve shlex shutil smtplib socket sqlite3 statistics string struct "
    "subprocess tarfile tempfile textwrap threading timeit tokenize trace traceback turtle "
    "typing unittest urllib uuid warnings weakref xml zipfile zlib"
).split()


def stdlib_text() -> str:
    """Docstrings of standard-library modules and their public members: real English prose."""
    parts: list[str] = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module missing from this Python build is simply skipped
            continue
        docs = [mod.__doc__ or ""]
        for attr in sorted(dir(mod)):
            if not attr.startswith("_"):
                docs.append(getattr(getattr(mod, attr, None), "__doc__", None) or "")
        parts.extend(d.strip() for d in docs if isinstance(d, str) and len(d.strip()) > 40)
    seen, out = set(), []
    for p in parts:  # builtins share docstrings across modules: keep one copy
        if p not in seen:
            seen.add(p)
            out.append(p)
    return "\n\n".join(out)


@dataclass
class DemoResult:
    method: str
    params: int
    train_seconds: float
    train_ce: float
    rows: list[dict]  # one per tau: val_ce, mean_depth, flops_per_token
    soft_ce: float  # validation CE of the soft (Jacobi, training) computation at J = jacobi_iters
    jacobi_gap: float  # mean |logit difference| between soft and exact (tau=1e-4) on validation


def run_demo(steps: int = 300, seq_len: int = 64, batch: int = 16, seed: int = 0, log=print) -> list[DemoResult]:
    """Train and evaluate each method on the same corpus; the validation batch and then every
    training batch come from one generator seeded with ``seed``."""
    chars, train, val = _char_corpus(log)
    g = torch.Generator().manual_seed(seed)

    def batch_from(src: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, len(src) - seq_len - 1, (n,), generator=g)
        x = torch.stack([src[j : j + seq_len] for j in i])  # (n, seq_len)
        y = torch.stack([src[j + 1 : j + seq_len + 1] for j in i])  # (n, seq_len): the next characters
        return x, y

    xv, yv = batch_from(val, 8)
    results = []
    for method in ("vanilla", "ponderlm2", "ponderlm3"):
        torch.manual_seed(seed)
        cfg = ModelConfig(
            vocab_size=len(chars), d_model=64, n_layers=2, n_heads=4, d_ff=172,
            max_seq_len=seq_len, method=method, max_ponder_steps=2, penalty_weight=0.05,
            router_init_bias=2.0,
        )  # fmt: skip
        model = PonderLM(cfg)
        t0 = time.perf_counter()
        ce = _train(model, lambda: batch_from(train, batch), steps, seed, log)
        secs = time.perf_counter() - t0
        rows, soft_ce, gap = _evaluate(model, xv, yv)
        results.append(DemoResult(method, model.num_parameters(), secs, ce, rows, soft_ce, gap))
    return results


def _char_corpus(log) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(characters, train ids, validation ids): the docstrings as character ids, the last 5% held out."""
    text = stdlib_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)  # (N,)
    n_val = len(data) // 20
    log(f"corpus: {len(text):,} characters of standard-library docstrings, vocab {len(chars)}")
    return chars, data[:-n_val], data[-n_val:]


def _train(model: PonderLM, next_batch, steps: int, seed: int, log) -> float:
    """``steps`` AdamW steps in the soft (Jacobi) computation; returns the last step's CE."""
    cfg = model.cfg
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    ce = float("nan")
    for step in range(steps):
        x, y = next_batch()
        out = model(x, mode="soft", jacobi_iters=jacobi_iters_at(step + 1, seed, cfg.jacobi_train_iters))
        loss, m = ponder_loss(out, y, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ce = float(m["ce"])
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"  {cfg.method:9s} step {step + 1:4d}/{steps}  ce {ce:.3f}  mean depth {float(m['mean_depth']):.2f}")
    return ce


@torch.no_grad()
def _evaluate(model: PonderLM, xv: torch.Tensor, yv: torch.Tensor) -> tuple[list[dict], float, float]:
    """(a row per tau in the exact computation, soft CE, Jacobi gap at the first tau) on one batch."""
    cfg = model.cfg
    model.eval()
    rows = []
    soft = model(xv, mode="soft")
    soft_ce = float(torch.nn.functional.cross_entropy(soft.logits.flatten(0, 1), yv.flatten()))
    taus = (1e-4, 0.1, 0.3) if cfg.has_router else (cfg.tau,)
    for tau in taus:
        ex = model(xv, mode="exact", tau=tau)
        val_ce = torch.nn.functional.cross_entropy(ex.logits.flatten(0, 1), yv.flatten())
        rows.append(
            dict(
                tau=tau,
                val_ce=float(val_ce),
                mean_depth=float(ex.depth.mean()),
                flops_per_token=flops.inference_flops(cfg, ex.depth).per_token,
            )
        )
        if tau == taus[0]:
            gap = float((soft.logits - ex.logits).abs().mean())
    return rows, soft_ce, gap


def format_table(results: list[DemoResult]) -> str:
    lines = [
        "| method | params | train s | val CE (soft, J=3) | Jacobi gap | tau | val CE (exact) | mean depth "
        "| inference MFLOPs/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for row in r.rows:
            lines.append(
                f"| {r.method} | {r.params:,} | {r.train_seconds:.0f} | {r.soft_ce:.3f} | {r.jacobi_gap:.1e} | "
                f"{row['tau']:g} | {row['val_ce']:.3f} | {row['mean_depth']:.2f} | "
                f"{row['flops_per_token'] / 1e6:.3f} |"
            )
    return "\n".join(lines)


def main(steps: int, seed: int) -> int:
    t0 = time.perf_counter()
    results = run_demo(steps=steps, seed=seed)
    print()
    print(format_table(results))
    print(f"\nwall time {time.perf_counter() - t0:.0f}s")
    print("Jacobi gap: mean |logit difference| between the training (soft) and inference (exact) computations.")
    print(json.dumps({r.method: dict(rows=r.rows, soft_ce=r.soft_ce, jacobi_gap=r.jacobi_gap) for r in results}))
    return 0

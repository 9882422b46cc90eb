"""Golden outputs of every method, pinned before the architecture refactor (issue 14) and checked
after every change: logits and depths of the three modes, greedy and sampled ``generate`` in both
schedules with the exact prefill (tokens, depths, the committed KV-cache entries; the default
converged prefill equals it within its tolerance: tests/test_generate.py) and the FLOPs counts, on tiny float64
models. Token ids, depths, cache lengths and FLOPs must match exactly; floating-point values to
1e-12 relative (float64 round-off from another SIMD path, not a change of computation);
``GOLDEN_TOL=0 OMP_NUM_THREADS=1`` demands bit-identity, which holds on the machine that recorded
the fixture (one thread: the summaries are sums, and threads reduce in another order).

Regenerate only on purpose, when a change of computation is intended and explained:
``PONDERLM_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from ponderlm.model.flops import inference_flops, training_flops_per_token

from conftest import METHODS, tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "golden.json"
TAU = 0.4
TOL = float(os.environ.get("GOLDEN_TOL", "1e-12"))  # GOLDEN_TOL=0 checks bit-identity on the recording machine


def _floats(t: torch.Tensor) -> dict:
    """A float tensor as a few exact summaries and a slice of raw values."""
    t = t.detach().double()
    return {"shape": list(t.shape), "sum": t.sum().item(), "sumsq": (t * t).sum().item(),
            "head": t.flatten()[:16].tolist()}  # fmt: skip


def _ints(t: torch.Tensor) -> list:
    return t.long().tolist()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 61, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    return ids, mask


def _generate(model, ids, mask, **kw) -> dict:
    caches = []
    real_new_cache = model.new_cache

    def capture(*a, **k):
        caches.append(real_new_cache(*a, **k))
        return caches[-1]

    model.new_cache = capture
    try:
        prefill = "exact" if model.cfg.uses_jacobi else "auto"  # as recorded (auto was exact for latent thoughts)
        out = model.generate(ids, 8, attention_mask=mask, tau=TAU, prefill=prefill, **kw)
    finally:
        del model.new_cache
    rec = {"tokens": _ints(out.tokens), "depth": _ints(out.depth), "prompt_depth": _ints(out.prompt_depth),
           "cache_entries": _ints(out.cache_entries)}  # fmt: skip
    rounds = getattr(caches[-1], "rounds", [caches[-1]])
    for r, c in enumerate(rounds):
        n = c.lengths.tolist()
        rec[f"cache{r}_lengths"] = n
        for b, length in enumerate(n):  # only committed entries: the rest is scratch space
            rec[f"cache{r}_row{b}_k"] = _floats(torch.stack([k[b, :, :length] for k in c.k]))
            rec[f"cache{r}_row{b}_v"] = _floats(torch.stack([v[b, :, :length] for v in c.v]))
            rec[f"cache{r}_row{b}_bias"] = _floats(c.bias[b, :length])
    return rec


def golden_record(method: str) -> dict:
    model = tiny_model(method, seed=0)
    ids, mask = _inputs()
    rec: dict = {}
    with torch.no_grad():
        for mode, kw in (("soft", {"jacobi_iters": 3}), ("hard", {"tau": TAU, "jacobi_iters": 3}),
                         ("exact", {"tau": TAU})):  # fmt: skip
            out = model(ids, mode=mode, attention_mask=None if mode == "soft" else mask, **kw)  # soft: packed rows
            rec[f"{mode}_logits"] = _floats(out.logits)
            rec[f"{mode}_depth"] = _floats(out.depth)
            if mode == "exact":
                rec["flops_exact_per_token"] = inference_flops(model.cfg, out.depth, mask.bool()).per_token
    # the reference count, every pass backpropagated (recorded so; truncation's count: tests/test_flops.py)
    rec["train_flops_per_token"] = training_flops_per_token(model.cfg.replace(jacobi_grad_passes=0), 7)
    schedules = ["token", "slot"] if model.cfg.n_rounds == 1 else ["token"]
    for schedule in schedules:
        rec[f"greedy_{schedule}"] = _generate(model, ids, mask, schedule=schedule)
        rec[f"sampled_{schedule}"] = _generate(model, ids, mask, schedule=schedule, temperature=0.9, top_p=0.95,
                                               seed=3)  # fmt: skip
    return rec


def mismatches(got, want, path: str) -> list[tuple]:
    """Every place where ``got`` differs from the golden ``want`` (exact, floats to TOL)."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or sorted(got) != sorted(want):
            return [(path, "keys", sorted(got) if isinstance(got, dict) else got, sorted(want))]
        return [m for k in want for m in mismatches(got[k], want[k], f"{path}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [(path, "length", got, want)]
        return [m for i, (g, w) in enumerate(zip(got, want, strict=True)) for m in mismatches(g, w, f"{path}[{i}]")]
    if isinstance(want, float):
        return [] if math.isclose(got, want, rel_tol=TOL, abs_tol=TOL) else [(path, got, want)]
    return [] if got == want else [(path, got, want)]


def test_fixture_covers_every_method():
    if os.environ.get("PONDERLM_REGEN_GOLDEN"):
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps({m: golden_record(m) for m in METHODS}, indent=1) + "\n")
    assert sorted(json.loads(FIXTURE.read_text())) == sorted(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_outputs_match_the_golden_record(method):
    want = json.loads(FIXTURE.read_text())[method]
    assert mismatches(golden_record(method), want, method) == []

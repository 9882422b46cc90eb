"""Soft-mask attention: PonderLM-3's per-key bias inside fused SDPA (augmented head dimension)
against plain causal attention of the same length, and a dense (L, L) additive mask for reference.

    python benchmarks/attention.py                     # CPU: L up to 4096
    python benchmarks/attention.py --device cuda       # bf16, L up to 8192

Target (issue 7): biased <= 1.15x the time and <= 1.1x the peak memory of plain causal attention.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    base_parser,
    finish,
    isolated_peak_mb,
    machine,
    max_rss_mb,
    reset_peak_rss,
    setup,
    sync,
    table,
    timeit,
)

from ponderlm.layers import biased_causal_attention

VARIANTS = ("plain", "biased", "dense")


def inputs(L: int, heads: int, head_dim: int, device, dtype, grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, L, head_dim, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3))
    bias = (-torch.rand(1, L, generator=g) * 5).to(device, dtype)  # log w <= 0
    return q, k, v, bias


def run(variant: str, q, k, v, bias):
    if variant == "plain":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if variant == "biased":
        return biased_causal_attention(q, k, v, bias)
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    mask = bias[:, None, None, :].expand(1, 1, L, L).masked_fill(~causal, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def step(variant: str, x, backward: bool):
    out = run(variant, *x)
    if backward:
        out.float().sum().backward()
    return out


def probe(args) -> None:
    """One variant at one length, alone in this process: print its peak memory above baseline."""
    device, dtype = setup(args)
    base = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x = inputs(args.length, args.heads, args.head_dim, device, dtype, args.backward)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    step(args.variant, x, args.backward)
    sync(device)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else max_rss_mb() - base
    print(f'{{"peak_mb": {peak}}}')


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="slot sequence lengths (K+1)*T")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--backward", action="store_true", help="time forward + backward (the training path)")
    p.add_argument("--probe", action="store_true", help=argparse_hidden())
    p.add_argument("--variant", default="plain")
    p.add_argument("--length", type=int, default=0)
    args = p.parse_args()
    if args.probe:
        return probe(args)
    device, dtype = setup(args)
    lengths = args.lengths or ([1024, 2048, 4096, 8192] if device.type == "cuda" else [512, 1024, 2048, 4096])
    rows = []
    for L in lengths:
        x = inputs(L, args.heads, args.head_dim, device, dtype, args.backward)
        row = {"L": L}
        for var in VARIANTS:
            row[f"{var}_ms"] = 1e3 * timeit(lambda var=var, x=x: step(var, x, args.backward), device, args.repeats)
            common = ["--device", args.device, "--variant", var, "--length", str(L), "--heads", str(args.heads),
                      "--head-dim", str(args.head_dim), "--threads", str(args.threads)]  # fmt: skip
            if args.dtype:
                common += ["--dtype", args.dtype]
            if args.backward:
                common.append("--backward")
            row[f"{var}_mb"] = isolated_peak_mb(__file__, ["--probe", *common])["peak_mb"]
        row["time_ratio"] = row["biased_ms"] / row["plain_ms"]
        row["mem_ratio"] = row["biased_mb"] / max(row["plain_mb"], 1e-9)
        rows.append(row)
    what = "forward+backward" if args.backward else "forward"
    dt = str(dtype).removeprefix("torch.")
    print(f"Soft-mask attention, {what}, {device} {dt}, B=1, H={args.heads}, head_dim={args.head_dim}; "
          f"median of {args.repeats}; peak memory of each alone, above baseline\n")  # fmt: skip
    print(table(rows, [("L", "L", "d"), ("plain_ms", "plain ms", ".2f"), ("biased_ms", "biased ms", ".2f"),
                       ("dense_ms", "dense-mask ms", ".2f"), ("time_ratio", "biased/plain time", ".3f"),
                       ("plain_mb", "plain MB", ".1f"), ("biased_mb", "biased MB", ".1f"),
                       ("dense_mb", "dense-mask MB", ".1f"), ("mem_ratio", "biased/plain memory", ".3f")]))  # fmt: skip
    print()
    finish({"benchmark": "attention", "mode": what, "device": str(device), "dtype": str(dtype), **machine(),
            "rows": rows}, args.out)  # fmt: skip


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()

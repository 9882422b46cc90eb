"""Soft-mask attention: PonderLM-3's per-key bias inside fused SDPA (augmented head dimension)
against plain causal attention of the same length, and a dense (L, L) additive mask for reference.

Two forms, both forward + backward with a fixed random upstream gradient:
  op     the attention call alone on given q, k, v (B, H, L, hd) tensors that stay alive;
  layer  the model's attention layer (``ponderlm.model.layers.Attention``: q/k/v projections, RoPE,
         attention, output projection) on a hidden state x (B, L, H * hd), with and without the
         key bias. Here q, k, v live only as long as the layer keeps them, as in training, so
         what the biased path keeps (its augmented copies) replaces what the plain path keeps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

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
    timeit_interleaved,
)

from ponderlm.model import layers
from ponderlm.model.config import ModelConfig
from ponderlm.model.layers import Attention, RotaryEmbedding, biased_causal_attention

VARIANTS = ("plain", "biased", "dense")
FORMS = ("op", "layer")


def inputs(form: str, L: int, heads: int, head_dim: int, device, dtype, grad: bool) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    d = heads * head_dim
    shapes = [(1, heads, L, head_dim)] * 3 if form == "op" else [(1, L, d)]
    leaves = [torch.randn(*s, generator=g).to(device, dtype).requires_grad_(grad) for s in shapes]
    bias = (-torch.rand(1, L, generator=g) * 5).to(device, dtype).requires_grad_(grad)  # log w <= 0
    out_shape = (1, heads, L, head_dim) if form == "op" else (1, L, d)
    x = {"form": form, "leaves": [*leaves, bias], "bias": bias,
         "grad": torch.randn(*out_shape, generator=g).to(device, dtype)}  # fmt: skip
    if form == "op":
        x["q"], x["k"], x["v"] = leaves
    else:
        torch.manual_seed(0)
        cfg = ModelConfig(d_model=d, n_heads=heads, max_seq_len=L)
        x["layer"] = Attention(cfg, 0).to(device, dtype)
        x["x"] = leaves[0]
        x["rope"] = RotaryEmbedding(head_dim, L, cfg.rope_theta)(torch.arange(L, device=device)[None], dtype)
    return x


def dense_mask_attention(q, k, v, bias, padded: bool = False):
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    mask = bias[:, None, None, :].expand(1, 1, L, L).masked_fill(~causal, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def run(variant: str, x: dict):
    if x["form"] == "op":
        q, k, v, bias = x["q"], x["k"], x["v"], x["bias"]
        if variant == "plain":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (biased_causal_attention if variant == "biased" else dense_mask_attention)(q, k, v, bias)
    if variant == "dense":  # the layer with SDPA swapped for the dense-mask reference
        with mock.patch.object(layers, "biased_causal_attention", dense_mask_attention):
            return x["layer"](x["x"], x["rope"], x["bias"])
    return x["layer"](x["x"], x["rope"], None if variant == "plain" else x["bias"])


def step(variant: str, x: dict, backward: bool):
    out = run(variant, x)
    if backward:
        out.backward(x["grad"])
    return out


def probe(args) -> None:
    """One variant at one length, alone in this process: print its peak memory above baseline."""
    device, dtype = setup(args)
    x = inputs(args.form, args.length, args.heads, args.head_dim, device, dtype, args.backward)
    step(args.variant, x, args.backward)  # warm-up: one-time allocations are not the variant's cost
    for t in [*x["leaves"], *(x["layer"].parameters() if "layer" in x else [])]:
        t.grad = None
    sync(device)
    base = reset_peak_rss()
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
    p.add_argument("--variant", default="plain", help=argparse_hidden())
    p.add_argument("--form", choices=FORMS, default=None, help="only this form (default: both)")
    p.add_argument("--length", type=int, default=0)
    args = p.parse_args()
    if args.probe:
        return probe(args)
    device, dtype = setup(args)
    lengths = args.lengths or ([1024, 2048, 4096, 8192] if device.type == "cuda" else [512, 1024, 2048, 4096])
    rows = []
    for form, L in [(f, n) for f in ([args.form] if args.form else FORMS) for n in lengths]:
        x = inputs(form, L, args.heads, args.head_dim, device, dtype, args.backward)
        row = {"form": form, "L": L}
        fns = {var: (lambda var=var, x=x: step(var, x, args.backward)) for var in VARIANTS}
        for var, sec in timeit_interleaved(fns, device, args.repeats).items():
            row[f"{var}_ms"] = 1e3 * sec
        for var in VARIANTS:
            common = ["--device", args.device, "--variant", var, "--form", form, "--length", str(L), "--heads",
                      str(args.heads), "--head-dim", str(args.head_dim), "--threads", str(args.threads)]  # fmt: skip
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
    print(
        f"Soft-mask attention, {what}, {device} {dt}, B=1, H={args.heads}, head_dim={args.head_dim}; "
        f"median of {args.repeats}, variants timed in turns; peak memory of each alone, above baseline\n"
    )
    print(table(rows, [("form", "form", "s"), ("L", "L", "d"), ("plain_ms", "plain ms", ".2f"),
                       ("biased_ms", "biased ms", ".2f"),
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

"""Shared helpers for the benchmarks: device/dtype choice, timing, peak memory, output.

Every benchmark prints a readable table and ends with ONE line of JSON (the machine-readable
result); ``--out FILE`` also writes that JSON. Ratios are always measured side by side in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    return p


def add_model_args(p: argparse.ArgumentParser, K: int = 3) -> None:
    """The backbone of a benchmark's random model (d=256, 4 layers: the CPU reference size)."""
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--K", type=int, default=K)


def setup(args) -> tuple[torch.device, torch.dtype]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[
            args.dtype
        ]
    return device, dtype


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of fn() over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median wall seconds of each fn, timed in turns (a, b, c, a, b, c, ...) so that drift in
    the machine's speed (a shared or throttled CPU) falls on every variant alike; the ratios of
    these medians are the side-by-side figures the benchmarks report."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Achieved FLOP/s of a large square torch.mm in ``dtype``: the machine's practical matmul peak."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = timeit(lambda: a @ b, device, repeats)
    return 2 * n**3 / s


def machine() -> dict:
    info = {"date": date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Reset the peak-RSS mark (Linux: ``5 > /proc/self/clear_refs``); returns the current RSS in MB."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    cur = _status_kb("VmRSS")
    return cur / 1024 if cur is not None else max_rss_mb()


def max_rss_mb() -> float:
    """Peak resident memory of this process since start or the last reset_peak_rss, in MB."""
    hwm = _status_kb("VmHWM")
    return hwm / 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def isolated_peak_mb(script: str, args: list[str]) -> dict:
    """Run ``script --probe ...`` in a fresh interpreter and return its JSON (peak memory of one
    configuration alone: CPU peak RSS cannot be reset inside one process).

    glibc's malloc keeps freed memory and raises its mmap threshold as it goes, so a freed tensor
    can stay resident and the peak RSS depends on allocation history; a fixed 64 KiB threshold
    gives every tensor of note its own mapping, returned to the OS when freed, so the peak RSS
    follows the peak of live tensors (other allocators ignore the variable)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table; cols are (key, header, format)."""
    out = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(format(r[k], f) if r.get(k) is not None else "" for k, _, f in cols) + " |")
    return "\n".join(out)


def finish(result: dict, out: Path | None) -> None:
    line = json.dumps(result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)
    print(line)


def bench_config(args, method: str, **model_overrides):
    """The ModelConfig of a benchmark's random model of ``method`` (add_model_args, --seq-len)."""
    from ponderlm import ModelConfig

    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       d_ff=args.d_ff, max_seq_len=args.seq_len, method=method, max_ponder_steps=args.K,
                       penalty_weight=0.05 if method == "ponderlm3" else 0.0, **model_overrides)  # fmt: skip


def train_step_fn(args, device: torch.device, amp_dtype: torch.dtype | None, compile_blocks: bool = False,
                  **model_overrides) -> tuple:  # fmt: skip
    """A PonderLM soft-mode training step (forward, loss, backward, AdamW) on random tokens, with
    the backbone of ``args`` (add_model_args, --seq-len, --batch, --jacobi). Returns (cfg, step)."""
    from ponderlm import PonderLM, ponder_loss

    cfg = bench_config(args, **model_overrides)
    torch.manual_seed(0)
    model = PonderLM(cfg).to(device)
    if compile_blocks:  # as train.compile does
        from ponderlm.training.trainer import compile_blocks as compile_

        compile_(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device)
    use_amp = amp_dtype is not None and amp_dtype != torch.float32
    amp = torch.autocast(device.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext()

    def step() -> None:
        with amp:
            out = model(ids[:, :-1], mode="soft", jacobi_iters=args.jacobi)
        loss, _ = ponder_loss(out, ids[:, 1:], cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return cfg, step

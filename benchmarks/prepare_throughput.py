"""Dataset building at scale: `ponderlm data prepare` against HF datasets' `map(num_proc=N)`.

A corpus of ``--gb`` GB of .jsonl is generated first (into ``--corpus``, never the repository;
reused when it is there): documents of 1-40 paragraphs drawn with a fixed seed from the paragraphs
of the default corpus, so the text is real English with a realistic word distribution. Then, one
run at a time, each in its own process tree, timed and sampled for memory every 0.1 s:

- ``ponderlm data prepare --input FILES --tokenizer T --workers N`` for each N in ``--workers``
  on the whole corpus, and with the largest N on the first ``--rss-gb`` GB prefixes (memory
  against corpus size);
- HF ``datasets``: ``load_dataset("json", ...)`` then ``map(tokenize, batched=True, num_proc=N)``
  with the same tokenizer file on the same files (its Arrow cache in a temporary directory; it
  writes no token shards, which ponderlm's figure includes). With ``num_proc=1`` the tokenizer's
  own threads use every core, so that row is also run with them off (``TOKENIZERS_PARALLELISM=
  false``: one core, like a ponderlm worker).

Throughput is MB of input .jsonl per second of wall time. Peak RSS is reported for the main
process and for the whole process tree (the sum over processes at the sampled moment of maximum).
Prints a table and one JSON line (``--out FILE`` saves it).

    python benchmarks/prepare_throughput.py --corpus /tmp/corpus --gb 2 --tokenizer data/default/tokenizer.json

The corpus alone (a stand-in for your own, e.g. to try ``data prepare`` at size) is
``--generate-only``, optionally ``--format jsonl.zst``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import finish, machine, table

START_SCRIPT = """
import sys, time
from ponderlm.data import TokenShards, TrainBatches, check_dataset
d = sys.argv[1]
t0 = time.perf_counter()
meta = check_dataset(d)
t1 = time.perf_counter()
x, y = TrainBatches(TokenShards(d, "train"), 1024, 0).batch(0, 32)
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {meta['splits']['train']['tokens']}")
"""

HF_SCRIPT = """
import sys, time
from datasets import load_dataset, disable_progress_bars
from tokenizers import Tokenizer
disable_progress_bars()
tok_file, cache, n, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
t0 = time.perf_counter()
ds = load_dataset("json", data_files=files, split="train", cache_dir=cache)
t1 = time.perf_counter()
tk = Tokenizer.from_file(tok_file)
def tokenize(batch):
    return {"ids": [e.ids for e in tk.encode_batch(batch["text"], add_special_tokens=False)]}
out = ds.map(tokenize, batched=True, batch_size=1000, num_proc=n if n > 1 else None, remove_columns=ds.column_names)
t2 = time.perf_counter()
print(f"HF load {t1 - t0:.1f} s, map {t2 - t1:.1f} s, {len(out)} rows")
"""


def paragraphs_of_default_corpus(cache_dir: Path) -> list[str]:
    from ponderlm.data.inputs import Reading
    from ponderlm.data.prepare import PrepareConfig, _units

    units, _ = _units(PrepareConfig(cache_dir=cache_dir, inputs=[]), [], log=lambda *_: None)
    paras = []
    for u in units:
        for d in u.documents(Reading()):
            paras += [p.strip() for p in d.text.split("\n\n") if len(p.strip()) > 40]
    return paras


def generate(corpus: Path, gb: float, part_mb: int, cache_dir: Path, fmt: str = "jsonl") -> list[Path]:
    """``gb`` GB of .jsonl text in parts of ``part_mb`` MB, as .jsonl or .jsonl.zst (reused when complete)."""
    done = corpus / "COMPLETE"
    settings = {"gb": gb, "part_mb": part_mb, "format": fmt}
    if done.exists() and json.loads(done.read_text()) == settings:
        return sorted(corpus.glob(f"part-*.{fmt}"))
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    paras = paragraphs_of_default_corpus(cache_dir)
    rng = random.Random(0)
    target, part, n = int(gb * 1e9), 0, 0
    written = 0
    while written < target:
        path = corpus / f"part-{part:04d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            size = 0
            while size < part_mb * 1e6 and written + size < target:
                text = "\n\n".join(rng.choice(paras) for _ in range(rng.randint(1, 40)))
                line = json.dumps({"id": n, "text": text}) + "\n"
                f.write(line)
                size += len(line.encode())
                n += 1
        written += path.stat().st_size
        part += 1
    if fmt == "jsonl.zst":
        import zstandard

        for path in sorted(corpus.glob("part-*.jsonl")):
            with open(path, "rb") as src, open(path.with_name(path.name + ".zst"), "wb") as dst:
                zstandard.ZstdCompressor().copy_stream(src, dst)
            path.unlink()
    done.write_text(json.dumps(settings))
    return sorted(corpus.glob(f"part-*.{fmt}"))


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds and peak RSS (MB) of its main process and of its whole tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = {"main": 0.0, "tree": 0.0}
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [ps, *ps.children(recursive=True)]
            rss = [p.memory_info().rss / 2**20 for p in procs]
        except psutil.Error:
            rss = []
        if rss:
            peak["main"] = max(peak["main"], rss[0])
            peak["tree"] = max(peak["tree"], sum(rss))
        time.sleep(0.1)
    reader.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd[:6])} ...\n{''.join(out[-20:])}")
    return {"seconds": wall, "peak_rss_main_mb": peak["main"], "peak_rss_tree_mb": peak["tree"], "log": out[-3:]}


def ponderlm_run(files: list[Path], tok: Path, workers: int, work: Path, keep: Path | None = None) -> dict:
    out = work / f"ds_w{workers}_{len(files)}"
    cmd = [sys.executable, "-m", "ponderlm", "data", "prepare", "--input", *map(str, files), "--tokenizer", str(tok),
           "--out", str(out), "--workers", str(workers)]  # fmt: skip
    try:
        return measure(cmd)
    finally:
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            out.rename(keep)
        shutil.rmtree(out, ignore_errors=True)


def prefix(files: list[Path], sizes: list[int], gb: float) -> list[Path]:
    """The first files that hold ``gb`` GB."""
    out, acc = [], 0
    for f, s in zip(files, sizes, strict=True):
        if acc >= gb * 1e9:
            break
        out.append(f)
        acc += s
    return out


def hf_run(files: list[Path], tok: Path, workers: int, work: Path, one_core: bool = False) -> dict:
    """HF datasets; ``one_core``: the tokenizer's own thread pool off, as in ponderlm's workers (with
    num_proc > 1 HF's forked workers turn it off themselves)."""
    cache = Path(tempfile.mkdtemp(dir=work, prefix="hf_cache_"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"} if one_core else None
    try:
        cmd = [sys.executable, "-c", HF_SCRIPT, str(tok), str(cache), str(workers), *map(str, files)]
        return measure(cmd, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, required=True, help="where the generated corpus is (or is made)")
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--part-mb", type=int, default=100)
    p.add_argument("--tokenizer", type=Path, default=Path("data/default/tokenizer.json"))
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts for both tools")
    p.add_argument("--rss-gb", default="0.2,1,2", help="prefixes (GB) for memory against size, largest --workers")
    p.add_argument("--no-hf", action="store_true", help="skip the HF datasets runs")
    p.add_argument("--only-rss", action="store_true", help="only the memory runs (--rss-gb)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ponderlm" / "packages")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: beside --corpus)")
    p.add_argument(
        "--throughput-gb",
        type=float,
        default=None,
        help="measure the tools against each other on this prefix (default: the whole corpus)",
    )
    p.add_argument("--keep", type=Path, default=None, help="keep the dataset of the largest memory run here")
    p.add_argument("--generate-only", action="store_true", help="make the corpus and stop")
    p.add_argument("--format", choices=("jsonl", "jsonl.zst"), default="jsonl", help="of the generated corpus")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    files = generate(args.corpus, args.gb, args.part_mb, args.cache_dir, args.format)
    if args.generate_only:
        print(f"{args.corpus}: {len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.0f} MB")
        return
    sizes = [f.stat().st_size for f in files]
    total_mb = sum(sizes) / 1e6
    work = args.work or args.corpus.parent / f"{args.corpus.name}_work"
    work.mkdir(parents=True, exist_ok=True)
    workers = [int(w) for w in args.workers.split(",")]
    rows = []

    def row(tool: str, n: int, fs: list[Path], r: dict) -> None:
        mb = sum(f.stat().st_size for f in fs) / 1e6
        rows.append({"tool": tool, "workers": n, "input_mb": round(mb, 1), "seconds": round(r["seconds"], 1),
                     "mb_per_s": round(mb / r["seconds"], 2), "peak_rss_main_mb": round(r["peak_rss_main_mb"]),
                     "peak_rss_tree_mb": round(r["peak_rss_tree_mb"])})  # fmt: skip
        print(f"  {tool} workers={n} {mb:.0f} MB: {r['seconds']:.1f} s, {mb / r['seconds']:.2f} MB/s, peak RSS "
              f"{r['peak_rss_main_mb']:.0f} MB main / {r['peak_rss_tree_mb']:.0f} MB tree", flush=True)  # fmt: skip

    compared = prefix(files, sizes, args.throughput_gb) if args.throughput_gb else files
    for n in [] if args.only_rss else workers:  # in turns: ponderlm, then HF, at each worker count
        row("ponderlm", n, compared, ponderlm_run(compared, args.tokenizer, n, work))
        if not args.no_hf:
            row("hf-datasets", n, compared, hf_run(compared, args.tokenizer, n, work))
            if n == 1:  # num_proc=None tokenizes with the tokenizer's threads, on every core
                row("hf-datasets, 1 core", n, compared, hf_run(compared, args.tokenizer, n, work, one_core=True))
    rss = sorted(float(g) for g in args.rss_gb.split(",") if g)
    for gb in rss:
        keep = args.keep if gb == rss[-1] else None
        part = prefix(files, sizes, gb)
        row("ponderlm", max(workers), part, ponderlm_run(part, args.tokenizer, max(workers), work, keep))
    if args.keep is not None:  # what `ponderlm train` does before its first step, on the biggest dataset
        shard_gb = sum(q.stat().st_size for q in args.keep.glob("*.bin")) / 1e9
        cached = subprocess.run([sys.executable, "-c", START_SCRIPT, str(args.keep)], capture_output=True, text=True)
        (args.keep / ".verified.json").unlink()  # as on a copy of the dataset: every shard hashed once
        fresh = subprocess.run([sys.executable, "-c", START_SCRIPT, str(args.keep)], capture_output=True, text=True)
        (c_check, c_batch, tokens), (f_check, _, _) = cached.stdout.split(), fresh.stdout.split()
        start = {"shards_gb": round(shard_gb, 2), "tokens": int(tokens), "check_cached_s": float(c_check),
                 "check_first_time_s": float(f_check), "first_batch_s": float(c_batch)}  # fmt: skip
        print(f"train start on {shard_gb:.2f} GB of shards ({int(tokens):,} tokens): dataset check {c_check} s "
              f"(verified before), {f_check} s (first time: every shard hashed), first batch {c_batch} s")  # fmt: skip
    cols = [("tool", "tool", "s"), ("workers", "workers", "d"), ("input_mb", "input MB", ".1f"),
            ("seconds", "s", ".1f"), ("mb_per_s", "MB/s", ".2f"), ("peak_rss_main_mb", "peak RSS main (MB)", ".0f"),
            ("peak_rss_tree_mb", "peak RSS tree (MB)", ".0f")]  # fmt: skip
    print(table(rows, cols))
    per_core = {r["workers"]: r["mb_per_s"] / r["workers"] for r in rows if r["tool"] == "ponderlm"}
    best = max(per_core.values())
    print(f"100 GB at the best measured {best:.2f} MB/s per core: {100e3 / best / 3600:.1f} core-hours")
    finish({"benchmark": "prepare_throughput", "machine": machine(), "corpus_mb": round(total_mb, 1),
            "tokenizer": str(args.tokenizer), "rows": rows, "hours_per_100gb_per_core": round(100e3 / best / 3600, 2),
            "train_start": start if args.keep is not None else None},
           args.out)  # fmt: skip


if __name__ == "__main__":
    main()

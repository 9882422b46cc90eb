"""Peak memory of `ponderlm data prepare` against the length of the longest document.

For each size in ``--mb``, writes a ``.jsonl`` file of ONE line: a single document of that many MB
of text without a blank line (so nothing cuts it into paragraphs): words, digits, punctuation,
some non-ASCII letters and single newlines, drawn with a fixed seed. Then runs

    ponderlm data prepare --input doc.jsonl --tokenizer T --workers N --out ...

in its own process tree, sampled every 0.1 s (psutil), and reports the peak RSS of the main
process and of the whole tree (the sum over its processes at the sampled moment of maximum).
Prints a table and one JSON line (``--out FILE`` saves it).

    python benchmarks/prepare_memory.py --mb 1.7,8.5,120 --workers 2 --work /tmp/dmem
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

from common import finish, machine, table
from prepare_throughput import measure

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will what can more out "
         "café naïve Straße élève über résumé данные 数据 1234 2026 3.14 e.g. (see below) -- [1] «quoted» "
         "x=y+z").split()  # fmt: skip


def write_document(path: Path, mb: float, seed: int = 0) -> int:
    """One .jsonl line holding one document of about ``mb`` MB (UTF-8); returns the text's bytes."""
    rng = random.Random(seed)
    block = []  # ~1 MB of text, then repeated with a rotating offset
    size = 0
    while size < 1 << 20:
        w = rng.choice(WORDS)
        sep = rng.choices([" ", "  ", "\n", ", ", ". ", "\t"], [80, 3, 4, 6, 6, 1])[0]
        block.append(w + sep)
        size += len((w + sep).encode())
    text = "".join(block)
    target = int(mb * (1 << 20))
    written = 0
    with path.open("w", encoding="utf-8") as f:
        f.write('{"text": "')
        i = 0
        while written < target:
            piece = text[i % 997 :][: max(1, target - written)]
            enc = json.dumps(piece, ensure_ascii=False)[1:-1]
            f.write(enc)
            written += len(piece.encode())
            i += 1
        f.write('"}\n')
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", default="1.7,8.5", help="document sizes in MB, comma-separated")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer", default="bpe", help="bpe, neox or a tokenizer.json")
    p.add_argument("--work", type=Path, required=True, help="scratch directory (never the repository)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for mb in (float(x) for x in args.mb.split(",")):
        doc = args.work / f"doc_{mb:g}mb.jsonl"
        if not doc.exists():
            write_document(doc, mb)
        out = args.work / f"ds_{mb:g}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "ponderlm", "data", "prepare", "--input", str(doc), "--tokenizer", args.tokenizer,
               "--out", str(out), "--workers", str(args.workers)]  # fmt: skip
        r = measure(cmd)
        meta = json.loads((out / "meta.json").read_text())
        shutil.rmtree(out, ignore_errors=True)
        rows.append({"document_mb": mb, "file_bytes": doc.stat().st_size, "workers": args.workers,
                     "tokenizer": args.tokenizer, "seconds": round(r["seconds"], 1),
                     "peak_rss_main_mb": round(r["peak_rss_main_mb"]), "peak_rss_tree_mb": round(r["peak_rss_tree_mb"]),
                     "tokens": sum(s["tokens"] for s in meta["splits"].values())})  # fmt: skip
        print(table(rows[-1:], [("document_mb", "doc MB", "g"), ("seconds", "s", ".1f"),
                                ("peak_rss_main_mb", "main MB", "d"), ("peak_rss_tree_mb", "tree MB", "d"),
                                ("tokens", "tokens", ",")]), flush=True)  # fmt: skip
    finish({"benchmark": "prepare_memory", **machine(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()

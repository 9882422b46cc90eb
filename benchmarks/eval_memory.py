"""Peak memory of ``ponderlm eval``: the zero-shot scorer's footprint on a real checkpoint.

Runs ``python -m ponderlm eval`` in a child process and reports its peak resident set size (the
kernel's high-water mark of the child's own memory map, ``VmHWM``, which the child writes when it
ends; ``ru_maxrss`` would also count the RSS of this process at the fork) next to the scores it wrote,
so that a change to the scorer can be checked for both memory and results. ``--code DIR`` runs the
``ponderlm`` package found in DIR instead of the installed one (e.g. an earlier version extracted
with ``git archive REV ponderlm | tar -x -C DIR``), for a before/after pair on the same machine.

    python benchmarks/eval_memory.py --checkpoint runs/smollm2 --limit 200 --eval-out runs/eval_mem
    python benchmarks/eval_memory.py --checkpoint runs/smollm2 --tasks sciq --limit 40 --code /tmp/old

Prints a table and ends with one line of JSON (``--out FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import finish, machine, table

ZERO_SHOT = "lambada,arc_easy,arc_challenge,piqa,hellaswag,winogrande,sciq"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tasks", default=ZERO_SHOT, help="ponderlm eval --tasks (default: the seven zero-shot tasks)")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tau", default=None, help="ponderlm eval --tau (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the eval")
    p.add_argument("--code", type=Path, default=None, help="directory holding the ponderlm package to run")
    p.add_argument("--eval-out", type=Path, required=True, help="ponderlm eval --out (replaced)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = p.parse_args()

    # not `python -m ponderlm`: that puts the working directory, and its ponderlm, ahead of --code
    code = str(args.code.resolve()) if args.code is not None else None
    launch = (
        "import sys; hwm_file = sys.argv.pop(1); code = sys.argv.pop(1); sys.path.insert(0, code or '');"
        "import ponderlm; print('ponderlm from', ponderlm.__file__, file=sys.stderr);"
        "from ponderlm.cli.main import main; rc = main(sys.argv[1:]);"
        "status = open('/proc/self/status').read();"
        "open(hwm_file, 'w').write(status.split('VmHWM:')[1].split()[0]); sys.exit(rc)"
    )
    fd, hwm_file = tempfile.mkstemp(suffix=".hwm")
    os.close(fd)
    cmd = [sys.executable, "-c", launch, hwm_file, code or "", "eval", "--checkpoint", args.checkpoint,
           "--tasks", args.tasks, "--limit", str(args.limit), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads),
           "--out", str(args.eval_out), "--overwrite"]  # fmt: skip
    if args.tau is not None:
        cmd += ["--tau", args.tau]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"ponderlm eval exited with {rc}")
    peak_kb = int(Path(hwm_file).read_text())  # KiB
    os.unlink(hwm_file)
    rows = json.loads((args.eval_out / "eval.json").read_text())["rows"]
    print(table(rows, [("task", "task", "s"), ("n", "docs", ".0f"), ("acc", "acc", ".4f"),
                       ("acc_norm", "acc_norm", ".4f"), ("ppl", "ppl", ".3f"), ("seconds", "s", ".0f")]))  # fmt: skip
    print(f"peak RSS {peak_kb / 2**20:.2f} GiB over {seconds:.0f} s")
    keep = ("tau", "task", "n", "acc", "acc_norm", "ppl", "tokens")
    finish({"benchmark": "eval_memory", **machine(), "code": code or "installed",
            "checkpoint": args.checkpoint, "tasks": args.tasks, "limit": args.limit, "batch_size": args.batch_size,
            "eval_threads": args.threads, "seconds": seconds, "peak_rss_gib": peak_kb / 2**20,
            "rows": [{k: r[k] for k in keep if k in r} for r in rows]}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()

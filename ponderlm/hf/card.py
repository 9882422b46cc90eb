"""The model card (README.md) of a ``ponderlm export``: what the model is and how to load it, from
what the run recorded. Nothing is estimated or invented: a number the run did not store is
reported as not recorded.

Where the facts come from (a checkpoint CK inside RUN/checkpoints/, as the trainer writes it):

- method, K, sizes: the model config; tau: the export's config;
- training data and tokens trained: CK/config.yaml (``train.data_dir``) and CK/trainer_state.json
  (``step``, ``tokens_seen``, ``init_from`` / ``converted_from`` when present);
- held-out numbers: RUN/metrics.jsonl's ``split: val`` record at the checkpoint's step (the trainer's
  own evaluation), and RUN/eval/eval.json, ``ponderlm eval``'s default output, only when its
  ``checkpoint`` is this checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ponderlm.limits import read_json_limited

METHODS = {
    "ponderlm3": "PonderLM-3: a router picks per token how many of the K latent thoughts it computes; "
    "at inference the steps below the threshold tau are pruned",
    "ponderlm2": "PonderLM-2: K latent thoughts per token, every token at full depth",
    "ponderlm1": "PonderLM-1 baseline: K extra rounds, each ending in norm + head",
    "loop": "looped baseline: K extra rounds of the shared stack",
    "pause": "pause-token baseline: K latent slots fed learned embeddings",
    "vanilla": "baseline transformer (no pondering)",
}
VAL_KEYS = ("hard_loss", "hard_ppl", "hard_mean_depth", "hard_flops_per_token", "soft_loss", "soft_ppl",
            "loss", "ppl", "mean_depth")  # fmt: skip


def _json(path: Path) -> Any:
    try:
        return read_json_limited(path, path.name)
    except Exception:
        return None


def _yaml(path: Path) -> Any:
    try:
        import yaml

        if path.stat().st_size > 1 << 20:
            return None
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:
        return None


def _val_record(run: Path, step: Any) -> dict | None:
    """The trainer's held-out record at ``step`` in RUN/metrics.jsonl (the last one, after a resume)."""
    path = run / "metrics.jsonl"
    if not isinstance(step, int) or not path.is_file() or path.stat().st_size > 64 << 20:
        return None
    found = None
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("split") == "val" and rec.get("step") == step:
                    found = rec
    except (OSError, UnicodeDecodeError):
        return None
    return found


def _eval_rows(run: Path, checkpoint: Path) -> tuple[list[dict], Path] | None:
    """``ponderlm eval``'s rows in RUN/eval/eval.json when they were computed on this checkpoint."""
    path = run / "eval" / "eval.json"
    data = _json(path) if path.is_file() else None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return None
    try:
        same = Path(str(data.get("checkpoint"))).resolve() == checkpoint.resolve()
    except (OSError, RuntimeError):
        same = False
    rows = [r for r in data["rows"] if isinstance(r, dict)]
    return (rows, path) if same and rows else None


def _num(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int) or (float(x).is_integer() and abs(x) < 1e15):
        return f"{int(x):,}"
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def run_facts(checkpoint: Path) -> dict[str, Any]:
    """What the run directory recorded about the checkpoint (only what is there)."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    state = _json(checkpoint / "trainer_state.json") if (checkpoint / "trainer_state.json").is_file() else None
    cfg = _yaml(checkpoint / "config.yaml") if (checkpoint / "config.yaml").is_file() else None
    train = cfg.get("train") if isinstance(cfg, dict) and isinstance(cfg.get("train"), dict) else {}
    facts: dict[str, Any] = {"checkpoint": str(checkpoint)}
    if isinstance(state, dict):
        for k in ("step", "tokens_seen", "converted_from"):
            if k in state:
                facts[k] = state[k]
    for k in ("data_dir", "init_from", "seq_len", "batch_size", "max_steps"):
        if train.get(k) not in (None, ""):
            facts[k] = train[k]
    if run is not None:
        val = _val_record(run, facts.get("step"))
        if val:
            facts["val"] = {k: val[k] for k in VAL_KEYS if k in val}
            facts["val_tokens"] = val.get("tokens")
        ev = _eval_rows(run, checkpoint)
        if ev:
            facts["eval_rows"], facts["eval_file"] = ev[0], str(ev[1])
    return facts


def _training_lines(facts: dict[str, Any]) -> list[str]:
    lines = []
    if "converted_from" in facts:
        lines.append(f"- converted from the transformers model `{facts['converted_from']}` (`ponderlm convert`)")
    if "data_dir" in facts:
        lines.append(f"- training data: `{facts['data_dir']}` (a `ponderlm data prepare` dataset)")
    if "init_from" in facts:
        lines.append(f"- initialised from `{facts['init_from']}`")
    if "step" in facts:
        lines.append(f"- optimizer steps: {_num(facts['step'])}")
    if "tokens_seen" in facts:
        lines.append(f"- tokens trained: {_num(facts['tokens_seen'])}")
    for k, label in (("seq_len", "sequence length"), ("batch_size", "batch size")):
        if k in facts:
            lines.append(f"- {label}: {_num(facts[k])}")
    return lines or ["- not recorded (the exported checkpoint carries no trainer state)"]


def _eval_lines(facts: dict[str, Any], run_tau: float) -> list[str]:
    lines = []
    if facts.get("val"):
        n = f" ({_num(facts['val_tokens'])} tokens trained)" if facts.get("val_tokens") else ""
        lines += [f"The trainer's held-out evaluation at this step{n} (`metrics.jsonl`, `split: val`; "
                  f"`hard_*`: pruned at the run's tau {run_tau:g}):", "",
                  "| metric | value |", "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {_num(v)} |" for k, v in facts["val"].items()]
        lines.append("")
    if facts.get("eval_rows"):
        rows = facts["eval_rows"]
        keys = [k for k in ("task", "tau", "n", "acc", "acc_norm", "mean_depth", "flops_per_token") if k in rows[0]]
        lines += [f"`ponderlm eval` on this checkpoint (`{facts['eval_file']}`):", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]  # fmt: skip
        lines += ["| " + " | ".join(_num(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    return lines or ["No evaluation was recorded for this checkpoint (run `ponderlm eval --checkpoint RUN`).", ""]


def model_card(model_cfg, tau: float, n_params: int, facts: dict[str, Any], *, self_contained: bool, name: str) -> str:
    """README.md of an export: the model, its training and evaluation as recorded, how to load it."""
    c = model_cfg
    method = METHODS.get(c.method, c.method)
    k = getattr(c, "max_ponder_steps", None)
    remote = "trust_remote_code=True" if self_contained else ""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [ponderlm, " + c.method + "]",
        "---",
        "",
        f"# {name}",
        "",
        f"A language model written by `ponderlm export`. Method: {method}.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{c.method}` |",
        f"| K (max ponder steps) | {k} |",
        f"| tau (pruning threshold in config.json) | {tau:g} |",
        f"| parameters | {n_params:,} |",
        f"| layers / d_model / heads | {c.n_layers} / {c.d_model} / {c.n_heads} |",
        f"| vocabulary | {c.vocab_size:,} |",
        f"| context | {c.max_seq_len:,} tokens |",
        "",
        "## Training",
        "",
        *_training_lines(facts),
        "",
        "## Evaluation",
        "",
        *_eval_lines(facts, c.tau),
        "## Loading",
        "",
        "With ponderlm installed (`pip install 'ponderlm[hf]'`), the Auto classes know the model type:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tok = AutoTokenizer.from_pretrained(PATH)",
        'out = model.generate(**tok("The", return_tensors="pt"), max_new_tokens=20, do_sample=False)',
        "print(tok.decode(out[0]))",
        "```",
        "",
    ]
    if self_contained:
        lines += [
            "Without ponderlm (only torch and transformers), this directory carries the modeling code",
            "(`ponderlm_*.py`, named in config.json's `auto_map`):",
            "",
            "```python",
            f"model = AutoModelForCausalLM.from_pretrained(PATH, {remote})",
            "```",
            "",
        ]
    else:
        lines += [
            "This export carries no modeling code: loading it needs ponderlm installed. `ponderlm export",
            "--self-contained` writes one that loads with `trust_remote_code=True` and no ponderlm.",
            "",
        ]
    lines += [
        "`model(ids)` returns the logits and the realised ponder depth of every position (`.depth`);",
        "`model.generate(..., tau=0.1)` overrides the pruning threshold per call.",
        "",
    ]
    return "\n".join(lines)

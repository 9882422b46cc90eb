"""lm-eval over HTTP equals lm-eval in process (issue 32, item 5), as a user runs it: the ``lm_eval``
console script in a subprocess, against a real ``ponderlm serve`` process on 127.0.0.1 over a tiny
random PonderLM-3 with its own small tokenizer.

What is checked, document by document (lm-eval's ``--log_samples``):

- ``--model local-completions`` with ``batch_size 4`` and ``num_concurrent=2`` on ponderlm_arc_easy,
  ponderlm_piqa and ponderlm_lambada gives every document the loglikelihoods the in-process adapter
  (``ponderlm lm-eval run --model ponderlm``, at the served tau) gives it, to float32 rounding, the same
  chosen answer (acc, acc_norm: no flipped choice) and the same lambada greedy flag, so the same acc,
  acc_norm and perplexity;
- a ``generate_until`` task at lm-eval's default settings (no generation_kwargs: until the blank line,
  greedy, lm-eval's API models' 256 tokens) over ``local-completions`` answers each document with the
  adapter's text;
- the same task through ``local-chat-completions --apply_chat_template`` answers each document with the
  text the model generates in process from the conversation the server renders (the plain template).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")
pytest.importorskip("aiohttp")

from test_serve import TAU, Server  # noqa: E402

MODEL = "tiny"
LIMIT = 6  # documents per task
LL_TASKS = ["ponderlm_arc_easy", "ponderlm_piqa", "ponderlm_lambada"]
GEN_TASK = "tiny_gen"  # a generate_until task on the lambada data, written below
GEN_LIMIT = 2
MAX_GEN_TOKS = 256  # lm-eval's API models' default max_gen_toks (the adapter's default is 64: passed to match)

# a generate_until task with no generation_kwargs: lm-eval's defaults (until "\n\n", greedy)
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{text.split(' ')[:-1] | join(' ')}}}}"
doc_to_target: "{{{{' ' + text.split(' ')[-1]}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random tiny PonderLM-3 (context 512) with a small BPE tokenizer, the project's lm-eval task
    files and the generate_until task beside them."""
    from test_lm_eval import tiny_lm_eval_world

    root = tmp_path_factory.mktemp("lmevalhttp")
    _, ck, _ = tiny_lm_eval_world(root, 512)
    (root / "tasks" / "tiny_gen.yaml").write_text(GEN_YAML.format(data=root / "tasks" / "data" / "lambada.jsonl"))
    return root, ck


@pytest.fixture(scope="module")
def server(world):
    s = Server(world[1], "--max-batch", "4", "--model-name", MODEL)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def adapter(world):
    from ponderlm.eval.lm_eval_adapter import PonderLMEval

    return PonderLMEval(checkpoint=str(world[1]), tau=float(TAU), max_gen_toks=MAX_GEN_TOKS)


DOCS = {**{t: list(range(LIMIT)) for t in LL_TASKS}, GEN_TASK: list(range(GEN_LIMIT))}  # lm-eval's --samples


def lm_eval_cli(root: Path, out: Path, *args: str) -> dict[str, dict[int, dict]]:
    """Run the ``lm_eval`` console script (the one beside this interpreter) on :data:`DOCS`'s tasks and
    documents, and read its samples: task -> doc_id -> sample."""
    exe = Path(sys.executable).with_name("lm_eval")
    cmd = [str(exe), *args, "--include_path", str(root / "tasks"), "--log_samples", "--output_path", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
    samples: dict[str, dict[int, dict]] = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        samples[task] = {s["doc_id"]: s for s in rows}
    return samples


@pytest.fixture(scope="module")
def http(world, server, tmp_path_factory):
    """``lm_eval --model local-completions`` (4 prompts a request, 2 requests at a time) on every task
    at once, as a user runs it: (samples, the aggregates it wrote)."""
    root, out = world[0], tmp_path_factory.mktemp("http")
    samples = lm_eval_cli(root, out, "--model", "local-completions", "--model_args",
                          f"model={MODEL},base_url={server.url}/v1/completions,num_concurrent=2,max_retries=1,"
                          "max_length=512,tokenized_requests=True", "--batch_size", "4",
                          "--tasks", ",".join(DOCS), "--samples", json.dumps(DOCS))  # fmt: skip
    return samples, json.loads(next(out.rglob("results_*.json")).read_text())["results"]


@pytest.fixture(scope="module")
def mine(world, adapter) -> dict[str, dict[int, dict]]:
    """The same tasks and documents through lm-eval over the in-process adapter (``ponderlm lm-eval run
    --model ponderlm``), the samples as ``--log_samples`` writes them."""
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model=adapter, tasks=list(DOCS), samples=DOCS, log_samples=True,
                                  task_manager=TaskManager(include_path=str(world[0] / "tasks")))  # fmt: skip
    out: dict[str, dict[int, dict]] = {}
    for t in DOCS:
        out[t] = {}
        for s in res["samples"][t]:  # the arguments as --log_samples writes them, every value as JSON has it
            s = {**s, "arguments": {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(args)}
                                    for i, args in enumerate(s["arguments"])}}  # fmt: skip
            out[t][s["doc_id"]] = json.loads(json.dumps(s, default=str))
    return out


def lls(sample: dict) -> list[tuple[float, bool]]:
    """A loglikelihood sample's (loglikelihood, greedy) per request (lm-eval logs them as strings)."""
    return [(float(ll), str(g) == "True") for ((ll, g),) in sample["resps"]]


def test_local_completions_equals_the_adapter_document_by_document(http, mine):
    http, results = http
    for task in LL_TASKS:
        assert sorted(http[task]) == sorted(mine[task]) == list(range(LIMIT)), task
        for d in range(LIMIT):
            h, m = http[task][d], mine[task][d]
            assert h["arguments"] == m["arguments"], (task, d)  # the same requests
            for (a, ga), (b, gb) in zip(lls(h), lls(m), strict=True):
                # float32 sums over the continuation: the server scores one prompt, the adapter a padded batch
                assert a == pytest.approx(b, rel=1e-6, abs=2e-5), (task, d, a, b)
                assert ga == gb, (task, d)
            for metric in ("acc", "acc_norm", "perplexity"):  # the per-document values the aggregates average
                if metric in m:
                    assert h[metric] == pytest.approx(m[metric], rel=1e-6, abs=2e-5), (task, d, metric)
            if task != "ponderlm_lambada":  # no flipped choice
                assert (h["acc"], h["acc_norm"]) == (m["acc"], m["acc_norm"]), (task, d)
    # and the aggregates lm-eval printed: the in-process documents' means
    for task in LL_TASKS:
        for metric in ("acc", "acc_norm"):
            if metric in mine[task][0]:
                want = sum(mine[task][d][metric] for d in range(LIMIT)) / LIMIT
                assert results[task][f"{metric},none"] == pytest.approx(want, abs=1e-12), (task, metric)
    ppl = math.exp(-sum(mine["ponderlm_lambada"][d]["perplexity"] for d in range(LIMIT)) / LIMIT)
    assert results["ponderlm_lambada"]["perplexity,none"] == pytest.approx(ppl, rel=1e-5)


def test_generate_until_over_completions_and_chat(world, server, adapter, http, mine, tmp_path):
    """A generate_until task at lm-eval's defaults: over local-completions each document's text is the
    adapter's; over local-chat-completions (with --apply_chat_template) it is the in-process greedy
    continuation of the conversation the server renders, cut at the plain template's end of turn."""
    import torch

    from ponderlm.serving.protocol import CHAT_STOP

    root, _ = world
    h_all, m_all = http[0][GEN_TASK], mine[GEN_TASK]
    assert sorted(h_all) == sorted(m_all) == list(range(GEN_LIMIT))
    for d in range(GEN_LIMIT):
        h, m = h_all[d], m_all[d]
        assert h["arguments"] == m["arguments"]  # the same prompt, until ["\n\n"], do_sample false
        assert h["arguments"]["gen_args_0"]["arg_1"]["until"] == ["\n\n"]
        assert h["resps"] == m["resps"] and h["exact_match"] == m["exact_match"], d
    assert any(r[0] for s in h_all.values() for r in s["resps"])  # something was generated

    chat = lm_eval_cli(root, tmp_path / "chat", "--model", "local-chat-completions", "--model_args",
                       f"model={MODEL},base_url={server.url}/v1/chat/completions,num_concurrent=2,max_retries=1,"
                       "max_length=512", "--apply_chat_template", "--tasks", GEN_TASK,
                       "--samples", json.dumps({GEN_TASK: DOCS[GEN_TASK]}))[GEN_TASK]  # fmt: skip
    assert sorted(chat) == list(range(GEN_LIMIT))
    model, tok = adapter.model, adapter.tok
    for d in range(GEN_LIMIT):
        args = chat[d]["arguments"]["gen_args_0"]
        sent = args["arg_0"][0] if isinstance(args["arg_0"], list) else args["arg_0"]
        messages = json.loads(sent)  # lm-eval's chat request: the conversation as JSON
        assert messages == [{"role": "user", "content": m_all[d]["arguments"]["gen_args_0"]["arg_0"]}]
        ids = tok.encode(tok.render_chat(messages, add_generation_prompt=True))
        g = model.generate(torch.tensor([ids]), MAX_GEN_TOKS, tau=float(TAU), temperature=0.0,
                           eos_token_id=tok.eot_id)  # fmt: skip
        text = tok.decode(g.tokens[0, len(ids) :].tolist()).split(tok.eos_token)[0]
        for stop in [CHAT_STOP, *args["arg_1"]["until"]]:
            text = text.split(stop)[0]
        assert chat[d]["resps"] == [[text]], d

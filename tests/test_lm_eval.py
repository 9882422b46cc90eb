"""Our zero-shot scorer and lm-evaluation-harness agree: lm-eval, running its own task
definitions on the same local data, sends exactly our (context, continuation) requests and
reports the same metrics."""

import random

import pytest
import torch

from ponderlm.data.tokenizer import Tokenizer
from ponderlm.eval.tasks import TASKS, load_tasks
from ponderlm.eval.zeroshot import score_task
from ponderlm.model.model import CONVERGED
from ponderlm.runs.checkpoint import save_checkpoint
from ponderlm.runs.config import RunConfig

from conftest import tiny_model
from fakepkgs import WORDS, make_fake_olmo_eval, paragraph

lm_eval = pytest.importorskip("lm_eval")

LIMIT = 6


def tiny_lm_eval_world(root, max_seq_len: int):
    """A random tiny PonderLM-3 checkpoint with a small BPE tokenizer, the offline task data and
    lm-eval task files for it: (cache, checkpoint, task names)."""
    from ponderlm.eval.lm_eval_adapter import write_tasks

    cache = make_fake_olmo_eval(root / "cache")
    rng = random.Random(0)
    tok = Tokenizer.train_bpe([paragraph(rng, 20) for _ in range(50)] + [" ".join(WORDS)], vocab_size=300)
    tok.save(root / "tokenizer.json")
    model = tiny_model("ponderlm3", vocab_size=320, max_seq_len=max_seq_len, dtype=torch.float32)
    ck = save_checkpoint(root / "run", 0, model.state_dict(), None, {"step": 0}, RunConfig(model=model.cfg),
                         root / "tokenizer.json", keep_last=1)  # fmt: skip
    return cache, ck, write_tasks(root / "tasks", cache, log=lambda *_: None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    return root, *tiny_lm_eval_world(root, 128)


def test_lm_eval_agrees_with_our_scorer(setup):
    from lm_eval.tasks import TaskManager

    from ponderlm.eval.lm_eval_adapter import PonderLMEval
    from ponderlm.loading import load_model

    root, cache, ck, names = setup
    lm = PonderLMEval(checkpoint=str(ck), tau=0.4)
    seen: list[tuple[str, str]] = []
    real = lm.loglikelihood

    def recording(requests, disable_tqdm=False):
        seen.extend(tuple(r.args) for r in requests)
        return real(requests, disable_tqdm)

    lm.loglikelihood = recording
    res = lm_eval.simple_evaluate(
        model=lm, tasks=names, limit=LIMIT, task_manager=TaskManager(include_path=str(root / "tasks"))
    )["results"]
    model, tok, _ = load_model(ck)
    ours = load_tasks(list(TASKS), cache, limit=LIMIT, log=lambda *_: None)
    ours_pairs = {
        (c, x) for docs in ours.values() for d in docs for c, x in zip(d.contexts, d.continuations, strict=True)
    }
    assert set(seen) == ours_pairs  # the same prompts, built independently by lm-eval's templates
    for name, docs in ours.items():
        mine = score_task(model, tok, docs, tau=0.4, jacobi=CONVERGED)  # `ponderlm eval`'s default computation
        theirs = res[f"ponderlm_{name}"]
        assert theirs["acc,none"] == pytest.approx(mine["acc"], abs=1e-12), name
        if "acc_norm" in mine:
            assert theirs["acc_norm,none"] == pytest.approx(mine["acc_norm"], abs=1e-12), name
        if name == "lambada":
            assert theirs["perplexity,none"] == pytest.approx(mine["ppl"], rel=1e-5)


def test_rolling_loglikelihood_and_generation(setup):
    from ponderlm.eval.lm_eval_adapter import PonderLMEval

    _, _, ck, _ = setup
    lm = PonderLMEval(checkpoint=str(ck), tau=0.4)

    class Req:
        def __init__(self, *args):
            self.args = args

    text = "the state of the world is good " * 3
    (ll,) = lm.loglikelihood_rolling([Req(text)])
    ids = lm.tok.encode(text)
    inp = torch.tensor([[lm.tok.eot_id, *ids[:-1]]])
    with torch.no_grad():
        lp = lm.model(inp, mode="hard", tau=0.4).logits[0].log_softmax(-1)
    assert ll == pytest.approx(float(lp.gather(-1, torch.tensor(ids)[:, None]).sum()), rel=1e-5)
    (gen,) = lm.generate_until([Req("the state of", {"until": ["\n"], "max_gen_toks": 5})])
    assert isinstance(gen, str) and "\n" not in gen

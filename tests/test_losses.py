import math

import pytest
import torch

from ponderlm import ponder_loss
from ponderlm.model.losses import depth_histogram

from conftest import tiny_model


def _out(method="ponderlm3", **kw):
    model = tiny_model(method, dtype=torch.float32, **kw)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 8))
    return model, model(ids, mode="soft"), ids


def test_ce_matches_manual_and_ignores_index():
    model, out, ids = _out("ponderlm2")
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    loss, m = ponder_loss(out, targets, model.cfg)
    logp = out.logits.log_softmax(-1)[:, :-1]
    manual = -logp.gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(loss, manual)
    assert m["penalty"] == 0 and m["mean_depth"] == 2.0
    assert "depth_hist/0" not in m  # no router in PonderLM-2


@pytest.mark.parametrize("kind", ["expected_depth", "target_budget"])
def test_penalty_forms(kind):
    model, out, ids = _out(penalty=kind, penalty_weight=0.5, target_depth=0.5)
    loss, m = ponder_loss(out, ids, model.cfg)
    ed = out.depth.mean()
    want = 0.5 * ed / 2 if kind == "expected_depth" else 0.5 * torch.relu(ed - 0.5) / 2
    torch.testing.assert_close(m["penalty"], want.detach())
    torch.testing.assert_close(loss, m["ce"] + m["penalty"])
    hist = torch.stack([m[f"depth_hist/{k}"] for k in range(3)])
    assert math.isclose(float(hist.sum()), 1.0, rel_tol=1e-5)
    torch.testing.assert_close((hist * torch.arange(3)).sum(), m["mean_depth"])


def test_penalty_gradient_lowers_expected_depth():
    model, out, ids = _out(penalty_weight=1.0)
    _, m0 = ponder_loss(out, ids, model.cfg)
    out.depth.mean().backward()  # the penalty's direction alone
    with torch.no_grad():
        for p in model.router.parameters():
            p -= 1.0 * p.grad
    _, m1 = ponder_loss(model(ids, mode="soft"), ids, model.cfg)
    assert m1["mean_depth"] < m0["mean_depth"]


def test_loss_rejects_bad_targets():
    model, out, ids = _out()
    with pytest.raises(ValueError, match="targets shape"):
        ponder_loss(out, ids[:, :-1], model.cfg)
    with pytest.raises(ValueError, match="no valid targets"):
        ponder_loss(out, torch.full_like(ids, -100), model.cfg)


def test_depth_histogram():
    d = torch.tensor([[0, 1, 1, 3]])
    h = depth_histogram(d, 3)
    assert h.tolist() == [0.25, 0.5, 0.0, 0.25]
    assert depth_histogram(d, 3, torch.tensor([[1, 1, 0, 0]])).tolist() == [0.5, 0.5, 0.0, 0.0]

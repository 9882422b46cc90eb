"""A tiny PonderLM-3 learns: it overfits a short text in a few hundred CPU steps."""

import torch

from ponderlm import PonderLM, ponder_loss
from ponderlm.training.schedule import jacobi_iters_at

from conftest import tiny_config

TEXT = (
    "the router decides how long each token ponders. easy tokens stop early, "
    "hard tokens think for the full number of steps before they predict the next one."
)


def test_tiny_ponderlm3_overfits_and_router_learns():
    chars = sorted(set(TEXT))
    ids = torch.tensor([[chars.index(c) for c in TEXT]])
    x, y = ids[:, :-1], ids[:, 1:]
    torch.manual_seed(0)
    cfg = tiny_config("ponderlm3", vocab_size=len(chars), d_model=48, n_heads=4, n_kv_heads=4,
                      d_ff=96, max_seq_len=256, router_init_bias=2.0)  # fmt: skip
    model = PonderLM(cfg)
    router0 = [p.detach().clone() for p in model.router.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for step in range(1, 251):
        out = model(x, mode="soft", jacobi_iters=jacobi_iters_at(step, 0, cfg.jacobi_train_iters))
        loss, m = ponder_loss(out, y, cfg)
        first = first if first is not None else float(m["ce"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first > 2.5
    with torch.no_grad():
        final = ponder_loss(model(x, mode="soft"), y, cfg)[1]["ce"]
        exact = model(x, mode="exact", tau=1e-4)
        exact_ce = torch.nn.functional.cross_entropy(exact.logits[0], y[0])
    moved = sum(float((p.detach() - p0).abs().sum()) for p, p0 in zip(model.router.parameters(), router0, strict=True))
    print(f"ce first={first:.3f} final={float(final):.4f} exact={float(exact_ce):.4f} moved={moved:.3f}")
    assert final < 0.15, final
    assert exact_ce < 0.3, exact_ce  # what was learned in training holds at inference
    assert moved > 0.1

import pytest
import torch
import torch.nn.functional as F

from ponderlm.model.layers import biased_causal_attention

from conftest import dense_slot_bias


@pytest.mark.parametrize("H, Hkv, hd", [(4, 4, 8), (4, 2, 8), (2, 1, 7 * 2)])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_biased_attention_equals_explicit_mask(H, Hkv, hd, dtype, tol):
    B, L = 2, 11
    q = torch.randn(B, H, L, hd, dtype=dtype)
    k = torch.randn(B, Hkv, L, hd, dtype=dtype)
    v = torch.randn(B, Hkv, L, hd, dtype=dtype)
    bias = -5 * torch.rand(B, L, dtype=dtype)
    bias[:, 3] = -30.0
    got = biased_causal_attention(q, k, v, bias)
    rep = H // Hkv
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    mask = dense_slot_bias(bias).unsqueeze(1)  # (B, 1, L, L)
    scores = q @ kk.transpose(-1, -2) / hd**0.5 + mask
    want = F.softmax(scores, -1) @ vv
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # no bias reduces to plain causal attention
    plain = biased_causal_attention(q, k, v, torch.zeros(B, L, dtype=dtype))
    ref = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    torch.testing.assert_close(plain, ref, atol=tol, rtol=tol)


def test_bias_floor_makes_key_nearly_invisible():
    B, H, L, hd = 1, 2, 6, 8
    q, k, v = (torch.randn(B, H, L, hd, dtype=torch.float64) for _ in range(3))
    bias = torch.zeros(B, L, dtype=torch.float64)
    bias[0, 2] = -30.0
    out = biased_causal_attention(q, k, v, bias)
    keep = [0, 1, 3, 4, 5]  # physically drop key/query 2
    pruned = F.scaled_dot_product_attention(q[:, :, keep], k[:, :, keep], v[:, :, keep], is_causal=True)
    torch.testing.assert_close(out[:, :, keep], pruned, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("H, Hkv, hd", [(4, 4, 8), (4, 2, 8), (2, 1, 14)])
def test_fused_biased_attention_gradients_equal_explicit_mask(H, Hkv, hd):
    """The custom backward (bias gradient from the augmented key column) equals autograd through
    the dense reference, for q, k, v and the bias, with and without grouped-query heads."""
    B, L = 2, 9
    g = torch.Generator().manual_seed(1)
    shapes = [(B, H, L, hd), (B, Hkv, L, hd), (B, Hkv, L, hd), (B, L)]
    leaves = [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    with torch.no_grad():
        leaves[3].mul_(3.0).sub_(4.0)
    upstream = torch.randn(B, H, L, hd, generator=g, dtype=torch.float64)

    def reference(q, k, v, bias):
        rep = H // Hkv
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = q @ kk.transpose(-1, -2) / hd**0.5 + dense_slot_bias(bias).unsqueeze(1)
        return F.softmax(scores, -1) @ vv

    got = torch.autograd.grad((biased_causal_attention(*leaves) * upstream).sum(), leaves)
    want = torch.autograd.grad((reference(*leaves) * upstream).sum(), leaves)
    for name, a, b in zip("q k v bias".split(), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=f"gradient of {name}")
    # a bias that does not require grad, and inference under no_grad, give the same output
    q, k, v, bias = leaves
    with torch.no_grad():
        ref = reference(q, k, v, bias)
        torch.testing.assert_close(biased_causal_attention(q, k, v, bias), ref, atol=1e-12, rtol=1e-12)
    out = biased_causal_attention(q, k, v, bias.detach())
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), ref, atol=1e-12, rtol=1e-12)

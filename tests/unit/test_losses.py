import pytest
import torch
import torch.nn.functional as F

from mmdc.losses import generalized_jsd, shifted_target_mask


def _logits(seed, shape=(2, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 2


def _forward_kl(s, t, temp=1.0):
    lt, ls = F.log_softmax(t / temp, -1), F.log_softmax(s / temp, -1)
    return (lt.exp() * (lt - ls)).sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_identical_distributions_give_zero(beta):
    x = _logits(0)
    assert generalized_jsd(x, x.clone(), beta=beta).abs().item() < 1e-5


def test_beta_zero_is_forward_kl_and_one_is_reverse_kl():
    s, t = _logits(1), _logits(2)
    assert torch.allclose(generalized_jsd(s, t, beta=0.0), _forward_kl(s, t), atol=1e-5)
    assert torch.allclose(generalized_jsd(s, t, beta=1.0), _forward_kl(t, s), atol=1e-5)
    assert torch.allclose(generalized_jsd(s, t, beta=0.0),
                          F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                   reduction="sum"), atol=1e-5)


def test_near_ends_approach_scaled_jsd_and_is_bounded():
    s, t = _logits(3), _logits(4)
    mid = generalized_jsd(s, t, beta=0.5)
    n = s.shape[0] * s.shape[1]
    assert 0 < mid.item() <= n * torch.log(torch.tensor(2.0)).item() + 1e-5  # JSD <= ln 2


def test_temperature_softens():
    s, t = _logits(5), _logits(6)
    assert generalized_jsd(s, t, beta=0.0, temperature=4.0) < generalized_jsd(s, t, beta=0.0)
    assert torch.allclose(generalized_jsd(s, t, beta=0.0, temperature=2.0),
                          _forward_kl(s, t, 2.0), atol=1e-5)


def test_masked_positions_do_not_count():
    s, t = _logits(7), _logits(8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :3] = True
    s2 = s.clone()
    s2[~mask] = 100 * torch.randn_like(s2[~mask])  # garbage where masked
    assert torch.allclose(generalized_jsd(s, t, mask, beta=0.3),
                          generalized_jsd(s2, t, mask, beta=0.3), atol=1e-5)
    assert torch.allclose(generalized_jsd(s, t, mask, beta=0.3),
                          generalized_jsd(s[0, :3], t[0, :3], beta=0.3), atol=1e-5)


def test_gradient_accumulation_invariance():
    """Sum / (target tokens in the whole window) gives the same loss and gradient whether
    a global batch of 4 is one micro-batch or two, with uneven target counts."""
    torch.manual_seed(0)
    s = _logits(9, (4, 6, 7)).requires_grad_(True)
    t = _logits(10, (4, 6, 7))
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[3, 1:] = False
    total = mask.sum()
    full = generalized_jsd(s, t, mask, beta=0.5) / total
    (g_full,) = torch.autograd.grad(full, s)
    acc = 0
    g_acc = torch.zeros_like(s)
    for part in (slice(0, 2), slice(2, 4)):
        loss = generalized_jsd(s[part], t[part], mask[part], beta=0.5) / total
        (g,) = torch.autograd.grad(loss, s)
        g_acc += g
        acc += loss.item()
    assert abs(acc - full.item()) < 1e-6
    assert torch.allclose(g_acc, g_full, atol=1e-7)


def test_vocab_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="share a vocabulary"):
        generalized_jsd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(torch.zeros(1, 5), torch.zeros(1, 5), beta=1.5)


def test_shifted_target_mask():
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert shifted_target_mask(labels).tolist() == [[False, True, True, False]]

"""Token sampler: support of top-k / top-p / vocabulary limit, frequencies against the
renormalised truncated distribution, greedy, exact log-probs, forced tokens, bad params."""

import math

import pytest
import torch

from r4b.rollout.sampling import SamplingParams, sample, truncated_logits

N_DRAWS = 40_000


def _reference_support_probs(logits_row: torch.Tensor, *, T: float, top_k: int, top_p: float,
                             vocab_limit: int | None = None, banned=()) -> torch.Tensor:
    """fp64 reference, written independently: restrict, renormalise, nucleus, renormalise."""
    z = logits_row.double() / T
    V = z.numel()
    allowed = [i for i in range(V if vocab_limit is None else vocab_limit) if i not in banned]
    order = sorted(allowed, key=lambda i: -float(z[i]))
    if top_k:
        order = order[:top_k]
    p = torch.softmax(z[order], dim=0)
    if top_p < 1.0:
        mass, keep = 0.0, 0
        while mass < top_p and keep < len(order):
            mass += float(p[keep])
            keep += 1
        order = order[:keep]
        p = torch.softmax(z[order], dim=0)
    out = torch.zeros(V, dtype=torch.float64)
    out[order] = p
    return out


def _check_frequencies(probs: torch.Tensor, tokens: torch.Tensor) -> None:
    """Zero draws outside the support; chi-square within the 99.99% quantile on the support."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    outside = counts[probs == 0].sum()
    assert outside == 0, f"{int(outside)} draws outside the support"
    support = probs > 0
    exp = probs[support] * tokens.numel()
    chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square 99.99% quantile (z = 3.719).
    limit = df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3 if df > 0 else 1e-9
    assert chi2 < limit, f"chi2 {chi2:.1f} over {df} dof exceeds {limit:.1f}"


@pytest.mark.parametrize("T,top_k,top_p,vocab_limit,banned", [
    (1.0, 5, 1.0, None, ()),
    (0.7, 0, 0.6, None, ()),
    (1.3, 8, 0.8, None, ()),
    (1.0, 0, 1.0, 11, ()),
    (0.9, 4, 0.9, 13, ()),
    (1.0, 6, 1.0, None, (3, 4, 9)),
    (0.8, 0, 0.9, 15, (0, 2)),
])
def test_truncation_frequencies(T, top_k, top_p, vocab_limit, banned):
    g = torch.Generator().manual_seed(1234)
    V = 17
    row = torch.randn(V, generator=g) * 2
    params = SamplingParams(temperature=T, top_k=top_k, top_p=top_p)
    ref = _reference_support_probs(row, T=T, top_k=top_k, top_p=top_p, vocab_limit=vocab_limit,
                                   banned=banned)
    ban = torch.tensor(banned, dtype=torch.long) if banned else None
    n_support = int((ref > 0).sum())
    assert 1 < n_support < V  # the truncation is active and leaves a choice
    tokens, lp = sample(row.expand(N_DRAWS, V), params, torch.Generator().manual_seed(7),
                        vocab_limit=vocab_limit, banned=ban)
    _check_frequencies(ref, tokens)
    # The sampler's own truncated distribution equals the reference, too.
    own = torch.softmax(truncated_logits(row[None], params, vocab_limit, ban).double(), -1)[0]
    torch.testing.assert_close(own, ref, atol=1e-6, rtol=0)
    # Log-probs are of the tempered *full* distribution, not of the truncated one.
    full = torch.log_softmax(row.float() / T, -1)
    assert torch.equal(lp, full[tokens])


def test_top_p_keeps_top_token_and_smallest_prefix():
    # Probabilities 0.5, 0.3, 0.2: top_p 0.5 keeps one token, 0.51 keeps two, 0.8 keeps two.
    row = torch.log(torch.tensor([[0.3, 0.5, 0.2]]))
    for p, support in ((0.1, {1}), (0.5, {1}), (0.51, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2})):
        z = truncated_logits(row, SamplingParams(top_p=p))
        assert set(torch.isfinite(z[0]).nonzero()[:, 0].tolist()) == support, p


def test_greedy_is_argmax_with_exact_logprob():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 301, generator=g) * 3
    for T in (0.5, 1.0, 2.0):
        params = SamplingParams(temperature=T, greedy=True, top_k=3, top_p=0.5)
        tok, lp = sample(logits, params, torch.Generator().manual_seed(1))
        assert torch.equal(tok, logits.argmax(-1))
        ref = torch.log_softmax(logits / T, -1).gather(-1, tok[:, None])[:, 0]
        assert torch.equal(lp, ref)
        assert lp.dtype == torch.float32


def test_logprob_exact_and_fp32_for_half_logits():
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(33, 1000, generator=g) * 4).to(torch.bfloat16)
    T = 0.8
    tok, lp = sample(logits, SamplingParams(temperature=T, top_k=50),
                     torch.Generator().manual_seed(5))
    assert lp.dtype == torch.float32 and tok.dtype == torch.int64
    ref = torch.log_softmax(logits.float() / T, -1).gather(-1, tok[:, None])[:, 0]
    assert torch.equal(lp, ref)
    assert (lp < 0).all()


def test_same_generator_same_draws_and_forced_rows():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(8, 50, generator=g)
    params = SamplingParams(temperature=1.0)
    t1, l1 = sample(logits, params, torch.Generator().manual_seed(2))
    t2, l2 = sample(logits, params, torch.Generator().manual_seed(2))
    assert torch.equal(t1, t2) and torch.equal(l1, l2)
    t3, _ = sample(logits, params, torch.Generator().manual_seed(3))
    assert not torch.equal(t1, t3)
    # Forced rows take the forced token with the model's log-prob; other rows keep their draw.
    forced = torch.full((8,), -1, dtype=torch.long)
    forced[[1, 5]] = torch.tensor([49, 0])
    t4, l4 = sample(logits, params, torch.Generator().manual_seed(2), forced=forced)
    assert t4[1] == 49 and t4[5] == 0
    keep = forced < 0
    assert torch.equal(t4[keep], t1[keep]) and torch.equal(l4[keep], l1[keep])
    full = torch.log_softmax(logits, -1)
    assert l4[1] == full[1, 49] and l4[5] == full[5, 0]


@pytest.mark.parametrize("field,value,exc", [
    ("temperature", 0.0, ValueError), ("temperature", -1.0, ValueError),
    ("temperature", float("nan"), ValueError), ("temperature", "hot", TypeError),
    ("top_p", 0.0, ValueError), ("top_p", 1.5, ValueError),
    ("top_k", -1, ValueError), ("top_k", 2.5, TypeError),
    ("max_new_tokens_think", 0, ValueError), ("max_new_tokens_no_think", -3, ValueError),
    ("max_new_tokens_auto", 1.5, TypeError), ("greedy", "yes", TypeError),
])
def test_bad_params_name_the_field(field, value, exc):
    with pytest.raises(exc, match=field):
        SamplingParams(**{field: value})


def test_bad_inputs():
    params = SamplingParams()
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randn(10), params)
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randint(0, 3, (2, 10)), params)
    with pytest.raises(ValueError, match="forced"):
        sample(torch.randn(2, 10), params, forced=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_limit"):
        sample(torch.randn(2, 10), params, vocab_limit=11)
    with pytest.raises(ValueError, match="banned"):
        sample(torch.randn(2, 10), params, banned=torch.tensor([10]))
    with pytest.raises(TypeError, match="params"):
        sample(torch.randn(2, 10), {"temperature": 1.0})
    with pytest.raises(ValueError, match="mode"):
        params.max_new_tokens("long")
    assert params.max_new_tokens("no_think") == params.max_new_tokens_no_think


# ---------------------------------------------------------------- counter-based draws
@pytest.mark.parametrize("T,top_k,top_p,vocab_limit,banned", [
    (1.0, 0, 1.0, None, ()), (0.7, 0, 0.6, None, ()), (0.9, 4, 0.9, 13, (0, 2))])
def test_inverse_cdf_draws_follow_the_truncated_distribution(T, top_k, top_p, vocab_limit, banned):
    from r4b.rollout.sampling import row_uniforms, sample_with_behaviour

    V = 17
    row = torch.randn(V, generator=torch.Generator().manual_seed(11)) * 2
    params = SamplingParams(temperature=T, top_k=top_k, top_p=top_p)
    probs = _reference_support_probs(row, T=T, top_k=top_k, top_p=top_p,
                                     vocab_limit=vocab_limit, banned=banned)
    seeds = torch.randint(0, 2**62, (N_DRAWS,), generator=torch.Generator().manual_seed(3))
    ban = torch.tensor(list(banned), dtype=torch.long) if banned else None
    tokens, lp, blp = sample_with_behaviour(row.expand(N_DRAWS, V), params,
                                            uniforms=row_uniforms(seeds, 0),
                                            vocab_limit=vocab_limit, banned=ban)
    _check_frequencies(probs, tokens)
    # policy: full tempered distribution; behaviour: the renormalised truncated one
    full = torch.log_softmax(row.double() / T, -1)
    torch.testing.assert_close(lp.double(), full[tokens], rtol=0, atol=1e-5)
    torch.testing.assert_close(blp.double(), probs.log()[tokens], rtol=0, atol=1e-5)


def test_top_p_importance_weight_is_the_kept_mass():
    """With top-p < 1 the weight exp(policy - behaviour) that corrects the truncation equals
    S, the probability mass top-p kept (not 1, which the policy log-prob alone would give)."""
    from r4b.rollout.sampling import row_uniforms, sample_with_behaviour

    V = 50
    row = torch.randn(V, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(top_p=0.7)
    seeds = torch.arange(64, dtype=torch.long)
    tokens, lp, blp = sample_with_behaviour(row.expand(64, V), params,
                                            uniforms=row_uniforms(seeds, 5))
    kept = torch.isfinite(truncated_logits(row[None], params))[0]
    S = float(torch.softmax(row.double(), -1)[kept].sum())
    assert 0.69 <= S < 0.99
    torch.testing.assert_close(torch.exp(lp - blp).double(), torch.full((64,), S, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    # forced tokens were not drawn: their behaviour log-prob is their policy one
    forced = torch.full((64,), -1, dtype=torch.long)
    forced[:5] = V - 1
    t2, lp2, blp2 = sample_with_behaviour(row.expand(64, V), params, forced=forced,
                                          uniforms=row_uniforms(seeds, 5))
    assert (t2[:5] == V - 1).all() and torch.equal(lp2[:5], blp2[:5])


def test_row_uniforms_are_uniform_independent_and_reproducible():
    from r4b.rollout.sampling import row_uniforms

    seeds = torch.randint(0, 2**62, (200_000,), generator=torch.Generator().manual_seed(0))
    a, b = row_uniforms(seeds, 0), row_uniforms(seeds, 1)
    assert 0 <= float(a.min()) and float(a.max()) < 1
    assert abs(float(a.mean()) - 0.5) < 0.005 and abs(float(a.std()) - 12 ** -0.5) < 0.005
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.01
    assert torch.equal(row_uniforms(seeds[:7], 3), row_uniforms(seeds, 3)[:7])

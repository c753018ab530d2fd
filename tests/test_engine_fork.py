"""Shared prefill in the embedded engine: each distinct prompt (token ids and image content) is
prefilled once and its KV-cache rows are forked into the other requests of that prompt.  The
forked engine must give the samples and log-probs of the per-row prefill
(``share_prompts=False``) for text and image prompts, forced tokens, ragged batches and KV
waves; requests with equal ids but different images must not share; and the prefill must run
one row per distinct prompt."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_engine import PARAMS, _engine, _full_forward_logprobs, text  # noqa: E402,F401

from r4b.components import (ModelChoice, default_task, make_template,  # noqa: E402
                             make_tokenizer, model_config)
from r4b.data import make_task  # noqa: E402
from r4b.models import build_model  # noqa: E402
from r4b.rollout import EmbeddedEngine, RolloutRequest  # noqa: E402
from r4b.rollout.engine import _as_images, fork_cache_rows, prompt_groups  # noqa: E402


class Counting(torch.nn.Module):
    """The model, recording each prefill forward (``return_hidden=True``): its rows, prompt
    tokens and images."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.prefills: list[dict] = []

    @property
    def cfg(self):
        return self.inner.cfg

    @property
    def vocab_size(self):
        return self.inner.vocab_size

    def new_kv_cache(self, *args, **kwargs):
        return self.inner.new_kv_cache(*args, **kwargs)

    def image_token_counts(self, images):
        return self.inner.image_token_counts(images)

    def logits_of_hidden(self, hidden, **kwargs):
        return self.inner.logits_of_hidden(hidden, **kwargs)

    def forward(self, **kwargs):
        if kwargs.get("return_hidden"):
            ids, im = kwargs["input_ids"], kwargs.get("images")
            self.prefills.append({"rows": ids.shape[0], "tokens": ids.numel(),
                                  "prompts": [tuple(r) for r in ids.tolist()],
                                  "images": 0 if im is None else im.num_images})
        return self.inner(**kwargs)


@pytest.fixture(scope="module")
def vision():
    tok = make_tokenizer(ModelChoice())
    task = default_task()
    cfg = model_config(ModelChoice(), tok, task)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tpl = make_template(tok, cfg)
    items = make_task(3, 4, config=task)
    return SimpleNamespace(tok=tok, cfg=cfg, model=model, tpl=tpl, items=items)


def _bpo_groups(env, items, g: int = 2, n_images: int = 0, images=None, fresh: bool = False):
    """Per item: g forced-think + g forced-no-think requests under token routing (one prompt)
    and the same under prompt routing (two prompts: one per mode prefix).  ``images(item)``
    gives an item's images: one object shared by the item's requests (as the trainer passes
    them), or with ``fresh`` a new object per request."""
    reqs = []
    for k, it in enumerate(items):
        im = None if images is None else images(it)
        auto = env.tpl.prompt_ids(it.question, n_images, "auto")
        for m in ("think", "no_think"):
            for _ in range(g):
                if fresh:
                    im = images(it)
                reqs.append(RolloutRequest(prompt_ids=auto, mode=m, images=im, group_id=k,
                                           forced_ids=env.tpl.forced_ids(m)))
                if fresh:
                    im = images(it)
                reqs.append(RolloutRequest(prompt_ids=env.tpl.prompt_ids(it.question, n_images, m),
                                           mode=m, images=im, group_id=k))
    return reqs


def _distinct(reqs) -> int:
    """Distinct (prompt ids, image bytes) pairs, computed independently of the engine."""
    def img_key(x):
        if x is None:
            return None
        arr = (np.stack([np.asarray(a) for a in x]) if isinstance(x, (list, tuple))
               else np.asarray(x))
        return arr.shape, arr.tobytes()
    return len({(tuple(r.prompt_ids), img_key(r.images)) for r in reqs})


def _run_both(model, env, reqs, seed: int, **kw):
    """The same requests through the shared and the per-row prefill; returns both outputs and
    both engines' stats."""
    shared, per_row = _engine(model, env, **kw), _engine(model, env, share_prompts=False, **kw)
    a = shared.generate(reqs, PARAMS, torch.Generator().manual_seed(seed))
    b = per_row.generate(reqs, PARAMS, torch.Generator().manual_seed(seed))
    return a, b, shared.last_stats, per_row.last_stats


def _assert_same(a, b):
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    assert [r.finished for r in a] == [r.finished for r in b]
    assert [r.mode_chosen for r in a] == [r.mode_chosen for r in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs),
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(torch.tensor(x.behaviour_logprobs),
                                   torch.tensor(y.behaviour_logprobs), atol=1e-6, rtol=1e-6)


def _assert_stats(reqs, st, ref):
    n = _distinct(reqs)
    assert st["distinct_prompts"] == n and ref["distinct_prompts"] == len(reqs)
    want = sum(len(p) for p in {tuple(r.prompt_ids): 0 for r in reqs})  # exact-duplicate ids only
    assert st["prompt_tokens"] == ref["prompt_tokens"] == sum(len(r.prompt_ids) for r in reqs)
    assert ref["prefill_tokens"] == ref["prompt_tokens"]
    if n == len({tuple(r.prompt_ids) for r in reqs}):  # images never split equal ids
        assert st["prefill_tokens"] == want
    assert st["prefill_tokens"] < ref["prefill_tokens"]


def test_text_groups_token_and_prompt_routing_match_per_row(text):
    # Two items of different question lengths, plus a ragged tail of truncated and unique
    # prompts: distinct prompts of equal and of unequal length in one batch.
    reqs = _bpo_groups(text, text.items[:3], g=2)
    base = reqs[0].prompt_ids
    reqs += [RolloutRequest(prompt_ids=base[:5], mode="auto"),
             RolloutRequest(prompt_ids=base[:5], mode="think",
                            forced_ids=text.tpl.forced_ids("think")),
             RolloutRequest(prompt_ids=base[:4] + [base[5]], mode="auto"),  # same length, differs
             RolloutRequest(prompt_ids=base[:1], mode="no_think")]
    assert len({len(r.prompt_ids) for r in reqs}) >= 4
    a, b, st, ref = _run_both(text.model, text, reqs, seed=2)
    _assert_same(a, b)
    _assert_stats(reqs, st, ref)
    # 3 items x (1 token-routing prompt + 2 prompt-routing prompts) + 3 distinct tail prompts
    assert st["distinct_prompts"] == 3 * 3 + 3
    # forced rows start with their forced tokens and are still exact against a full forward
    for r in a:
        f = r.request.forced_ids
        assert r.response_ids[:len(f)] == f
    for r in a[::5]:
        torch.testing.assert_close(torch.tensor(r.logprobs),
                                   _full_forward_logprobs(text.model, r, PARAMS.temperature),
                                   atol=1e-5, rtol=0)


def test_forked_rows_sample_independently(text):
    """Rows forked from one prompt draw their own tokens (their own seeds), so a group of
    identical requests does not collapse into copies of one completion."""
    it = text.items[0]
    prompt = text.tpl.prompt_ids(it.question, 0, "auto")
    reqs = [RolloutRequest(prompt_ids=prompt, mode="think", forced_ids=text.tpl.forced_ids("think"))
            for _ in range(6)]
    a, b, st, _ = _run_both(text.model, text, reqs, seed=4)
    _assert_same(a, b)
    assert st["distinct_prompts"] == 1 and st["prefill_tokens"] == len(prompt)
    assert len({tuple(r.response_ids) for r in a}) > 1


@pytest.mark.parametrize("n_images", [1, 2])
def test_image_groups_match_per_row(vision, n_images):
    items = vision.items[:2]
    nxt = {id(it): vision.items[(k + 1) % len(vision.items)] for k, it in enumerate(items)}

    def images(it):
        if n_images == 1:  # fixed-layout tiles [1, C, H, W]
            return np.stack(it.images)
        # two raw [C, H, W] images per prompt: this item's and the next one's
        return [it.images[0].copy(), nxt[id(it)].images[0].copy()]

    # one image: one array per item, shared by its requests (as the trainer passes them); two
    # images: a fresh list of fresh arrays per request (sharing is by content, not identity)
    fresh = n_images == 2
    reqs = _bpo_groups(vision, items, g=2, n_images=n_images, images=images, fresh=fresh)
    assert len({id(r.images) for r in reqs}) == (len(items) if n_images == 1 else len(reqs))
    reqs.append(RolloutRequest(prompt_ids=vision.tpl.prompt_ids("what is it?", 0, "auto"),
                               mode="auto"))  # a text-only row in the same batch
    a, b, st, ref = _run_both(vision.model, vision, reqs, seed=6)
    _assert_same(a, b)
    _assert_stats(reqs, st, ref)
    assert st["distinct_prompts"] == 2 * 3 + 1
    assert st["prefill_images"] == 2 * 3 * n_images and ref["prefill_images"] == 2 * 8 * n_images
    r = a[0]
    im = _as_images(r.request.images, 0, vision.cfg)  # as the engine hands images to the model
    torch.testing.assert_close(torch.tensor(r.logprobs),
                               _full_forward_logprobs(vision.model, r, PARAMS.temperature, im),
                               atol=1e-5, rtol=0)


def test_equal_prompts_with_different_images_do_not_share(vision):
    it = vision.items[0]
    prompt = vision.tpl.prompt_ids(it.question, 1, "auto")
    img = np.stack(it.images)
    one_pixel = img.copy()
    one_pixel[0, 0, 3, 4] += 0.25
    other = np.stack(vision.items[1].images)
    forced = vision.tpl.forced_ids("think")
    kinds = [img, one_pixel, other, img.copy(), torch.as_tensor(img.copy()), one_pixel.copy()]
    reqs = [RolloutRequest(prompt_ids=prompt, mode="think", forced_ids=forced, images=x)
            for x in kinds]
    a, b, st, ref = _run_both(vision.model, vision, reqs, seed=8)
    _assert_same(a, b)
    # img (x3, as arrays or a tensor), one_pixel (x2), other: three distinct prompts
    assert st["distinct_prompts"] == 3 and ref["distinct_prompts"] == 6
    assert st["prefill_tokens"] == 3 * len(prompt) and st["prefill_images"] == 3
    cfg = vision.cfg
    groups = prompt_groups(reqs, [_as_images(r.images, i, cfg) for i, r in enumerate(reqs)])
    assert groups == [[0, 3, 4], [1, 5], [2]]
    # the rows that differ by one pixel see different images: their first-token log-probs differ
    assert a[0].logprobs[0] != a[1].logprobs[0]


def test_one_prefill_row_per_distinct_prompt(vision):
    items = vision.items[:3]
    reqs = _bpo_groups(vision, items, g=2, n_images=1, images=lambda it: np.stack(it.images))
    for share in (True, False):
        model = Counting(vision.model)
        eng = _engine(model, vision, share_prompts=share)
        eng.generate(reqs, PARAMS, torch.Generator().manual_seed(1))
        rows = sum(p["rows"] for p in model.prefills)
        tokens = sum(p["tokens"] for p in model.prefills)
        prompts = [q for p in model.prefills for q in p["prompts"]]
        if share:
            # one row per distinct prompt, each prompt once, its image encoded once
            assert rows == _distinct(reqs) == 3 * 3
            assert sorted(prompts) == sorted({tuple(r.prompt_ids) for r in reqs})
            assert sum(p["images"] for p in model.prefills) == 3 * 3
        else:
            assert rows == len(reqs) and sum(p["images"] for p in model.prefills) == len(reqs)
        assert tokens == eng.last_stats["prefill_tokens"]
        assert len(model.prefills) == eng.last_stats["prefill_forwards"]
        assert eng.last_stats["distinct_prompts"] == rows


def test_prefill_token_budget_and_kv_waves_with_sharing(text):
    """Sharing composes with the prefill token budget (several forwards per length) and with
    KV waves (a prompt's rows may fall in different waves: each wave prefills it once)."""
    reqs = _bpo_groups(text, text.items[:3], g=2)
    free = _engine(text.model, text)
    want = free.generate(reqs, PARAMS, torch.Generator().manual_seed(3))
    budget = free.last_stats["kv_tokens_peak"] // 3
    for kw in ({"prefill_tokens": 1}, {"kv_budget_tokens": budget}):
        a, b, st, _ = _run_both(text.model, text, reqs, seed=3, **kw)
        _assert_same(a, b)
        _assert_same(a, want)
        assert _distinct(reqs) <= st["distinct_prompts"] < len(reqs)
    assert st["waves"] >= 3


def test_fork_cache_rows_copies_every_layer_prefix():
    from r4b.models.attention import KVCache

    torch.manual_seed(0)
    c = KVCache(num_layers=3, batch_size=6, max_seqlen=7, kv_heads=2, head_dim=4,
                dtype=torch.float32, device=torch.device("cpu"))
    for buf in (*c.k, *c.v):
        buf.normal_()
    c.lengths[:] = torch.tensor([5, 3, 0, 7, 2, 1])
    c._host_lengths[:] = c.lengths
    before = [b.clone() for b in (*c.k, *c.v)]
    fork_cache_rows(c, torch.tensor([0, 3, 0]), torch.tensor([2, 4, 5]), 3)
    for old, new in zip(before, (*c.k, *c.v)):
        want = old.clone()
        want[2, :3], want[4, :3], want[5, :3] = old[0, :3], old[3, :3], old[0, :3]
        assert torch.equal(new, want)  # beyond the prefix and in other rows: untouched
    assert c.lengths.tolist() == [5, 3, 3, 7, 3, 3] == c._host_lengths.tolist()
    cases = [((torch.tensor([0]), torch.tensor([1, 2]), 2), "same number of rows"),
             ((torch.tensor([0]), torch.tensor([6]), 2), r"dst rows must lie in \[0, 6\)"),
             ((torch.tensor([-1]), torch.tensor([2]), 2), r"src rows must lie in \[0, 6\)"),
             ((torch.tensor([0, 3]), torch.tensor([2, 2]), 2), "dst rows must be distinct"),
             ((torch.tensor([0]), torch.tensor([0]), 2), "must not overlap src"),
             ((torch.tensor([1]), torch.tensor([2]), 4), r"at least length=4.*\(1, 3\)"),
             ((torch.tensor([0]), torch.tensor([2]), 0), r"length must be an int in \[1, 7\]")]
    for args, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fork_cache_rows(c, *args)


def test_share_prompts_flag_is_checked(text):
    with pytest.raises(ValueError, match="share_prompts must be a bool, got 'yes'"):
        EmbeddedEngine(text.model, stop_ids=[1], share_prompts="yes")
    with pytest.raises(ValueError, match=r"images must hold one entry per request \(2\), got 1"):
        prompt_groups([RolloutRequest(prompt_ids=[1], mode="auto")] * 2, [None])

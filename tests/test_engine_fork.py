"""Shared prompts in the embedded engine: the distinct prompts of a batch (token ids and image
content) form a prefix tree whose nodes are prefilled once and held once in a
:class:`~r4b.models.attention.SharedKVCache`; each row holds only its response.  The shared
engine must give the samples and log-probs of the per-row prefill into the dense per-row cache
(``share_prompts=False``) for text and image prompts, forced tokens, ragged batches, prompt
routing (think / no-think prompts with a common prefix) and KV waves; requests with equal ids
but different images must not share; the prefill must run each prefix node once; and the KV
tokens the cache's buffers hold must be the distinct prompt prefixes plus the response budgets
(counted here from the prompts themselves and from the buffers' shapes)."""

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
from r4b.models.attention import (PrefixTree, SharedKVCache,  # noqa: E402
                                  shared_cached_attention)
from r4b.rollout import EmbeddedEngine, RolloutRequest  # noqa: E402
from r4b.rollout.engine import (_as_images, image_classes, prompt_groups,  # noqa: E402
                                prompt_tree)


class Counting(torch.nn.Module):
    """The model, recording each prefill forward (``return_hidden=True``: its rows, prompt
    tokens and images) and every KV cache it builds."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.prefills: list[dict] = []
        self.caches: list = []

    @property
    def cfg(self):
        return self.inner.cfg

    @property
    def vocab_size(self):
        return self.inner.vocab_size

    def new_kv_cache(self, *args, **kwargs):
        cache = self.inner.new_kv_cache(*args, **kwargs)
        self.caches.append(cache)
        return cache

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


def held_tokens(cache, kv_heads: int, head_dim: int) -> int:
    """KV tokens per layer that ``cache``'s key and value buffers hold, from their sizes."""
    per_token = 2 * len(cache.k) * kv_heads * head_dim
    n = sum(t.numel() for t in (*cache.k, *cache.v))
    assert n % per_token == 0
    return n // per_token


def _held(env, cache) -> int:
    return held_tokens(cache, env.cfg.lm.num_kv_heads, env.cfg.lm.head_dim)


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


def _bpo_groups(env, items, g: int = 2, n_images: int = 0, images=None, fresh: bool = False,
                routing=("token", "prompt")):
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
                if "token" in routing:
                    if fresh:
                        im = images(it)
                    reqs.append(RolloutRequest(prompt_ids=auto, mode=m, images=im, group_id=k,
                                               forced_ids=env.tpl.forced_ids(m)))
                if "prompt" in routing:
                    if fresh:
                        im = images(it)
                    reqs.append(RolloutRequest(
                        prompt_ids=env.tpl.prompt_ids(it.question, n_images, m), mode=m,
                        images=im, group_id=k))
    return reqs


def _img_key(x):
    if x is None:
        return None
    arr = np.stack([np.asarray(a) for a in x]) if isinstance(x, (list, tuple)) else np.asarray(x)
    return arr.shape, arr.tobytes()


def _distinct(reqs) -> int:
    """Distinct (prompt ids, image bytes) pairs, computed independently of the engine."""
    return len({(tuple(r.prompt_ids), _img_key(r.images)) for r in reqs})


def _prefix_tokens(reqs, image_token_id) -> int:
    """Distinct prompt prefixes, counted from the prompts: every prefix ``p[:k]`` of a text
    prompt; for a prompt with images, the prefixes within its images' bytes and its tokens
    through the last placeholder (prefixes are shared only there)."""
    seen = set()
    for r in reqs:
        p = tuple(r.prompt_ids)
        if r.images is None:
            bucket = None
        else:
            last = max(k for k, t in enumerate(p) if t == image_token_id)
            bucket = (_img_key(r.images), p[:last + 1])
        seen.update((bucket, p[:k]) for k in range(1, len(p) + 1))
    return len(seen)


def _budget(r) -> int:
    return PARAMS.max_new_tokens(r.mode) + len(r.forced_ids)


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


def _assert_stats(reqs, st, ref, image_token_id=None):
    """One-wave statistics of the shared (``st``) and per-row (``ref``) engines."""
    assert st["distinct_prompts"] == _distinct(reqs) and ref["distinct_prompts"] == len(reqs)
    assert st["prompt_tokens"] == ref["prompt_tokens"] == sum(len(r.prompt_ids) for r in reqs)
    assert ref["prefill_tokens"] == ref["prompt_tokens"] and ref["prefix_nodes"] == 0
    prefixes = _prefix_tokens(reqs, image_token_id)
    assert st["prefill_tokens"] == prefixes < ref["prefill_tokens"]
    assert st["kv_tokens_peak"] == prefixes + sum(_budget(r) for r in reqs)
    assert ref["kv_tokens_peak"] == len(reqs) * max(len(r.prompt_ids) + _budget(r) for r in reqs)


def test_text_groups_token_and_prompt_routing_match_per_row(text):
    # Two items of different question lengths, plus a ragged tail of truncated and unique
    # prompts, some a prefix of another: distinct prompts of equal and unequal length, prompt
    # ends inside the tree and at its leaves.
    reqs = _bpo_groups(text, text.items[:2], g=2)
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
    # 2 items x (1 token-routing prompt + 2 prompt-routing prompts) + 3 distinct tail prompts
    assert st["distinct_prompts"] == 2 * 3 + 3
    # forced rows start with their forced tokens and are still exact against a full forward
    for r in a:
        f = r.request.forced_ids
        assert r.response_ids[:len(f)] == f
    for r in a[::5]:
        torch.testing.assert_close(torch.tensor(r.logprobs),
                                   _full_forward_logprobs(text.model, r, PARAMS.temperature),
                                   atol=1e-5, rtol=0)


def test_forked_rows_sample_independently(text):
    """Rows of one prompt draw their own tokens (their own seeds), so a group of identical
    requests does not collapse into copies of one completion."""
    it = text.items[0]
    prompt = text.tpl.prompt_ids(it.question, 0, "auto")
    reqs = [RolloutRequest(prompt_ids=prompt, mode="think", forced_ids=text.tpl.forced_ids("think"))
            for _ in range(6)]
    a, b, st, _ = _run_both(text.model, text, reqs, seed=4)
    _assert_same(a, b)
    assert st["distinct_prompts"] == 1 and st["prefill_tokens"] == len(prompt)
    assert st["prefix_nodes"] == 1
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
    _assert_stats(reqs, st, ref, vision.cfg.image_token_id)
    assert st["distinct_prompts"] == 2 * 3 + 1
    # one root per item holds its images (the think / no-think prompts continue it)
    assert st["prefill_images"] == 2 * n_images and ref["prefill_images"] == 2 * 8 * n_images
    assert st["prefix_nodes"] == 2 * 3 + 1
    r = a[1]  # a prompt-routing row: its prompt is a root plus a mode node
    assert not r.request.forced_ids
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


def test_one_prefill_row_per_prefix_node(vision):
    """Under prompt routing each item's think and no-think prompts share the auto prompt (with
    the image): it is prefilled once, then each mode's remainder (the forced ids) against it."""
    items = vision.items[:3]
    reqs = _bpo_groups(vision, items, g=2, n_images=1, images=lambda it: np.stack(it.images),
                       routing=("prompt",))
    tpl = vision.tpl
    for share in (True, False):
        model = Counting(vision.model)
        eng = _engine(model, vision, share_prompts=share)
        eng.generate(reqs, PARAMS, torch.Generator().manual_seed(1))
        rows = sum(p["rows"] for p in model.prefills)
        tokens = sum(p["tokens"] for p in model.prefills)
        prompts = sorted(q for p in model.prefills for q in p["prompts"])
        if share:
            want = [tuple(tpl.prompt_ids(it.question, 1, "auto")) for it in items]
            want += [tuple(tpl.forced_ids(m)) for m in ("think", "no_think") for _ in items]
            assert prompts == sorted(want)
            assert rows == eng.last_stats["prefix_nodes"] == 3 * 3
            assert sum(p["images"] for p in model.prefills) == 3  # each image encoded once
        else:
            assert prompts == sorted(tuple(r.prompt_ids) for r in reqs)
            assert rows == len(reqs) and sum(p["images"] for p in model.prefills) == len(reqs)
        assert tokens == eng.last_stats["prefill_tokens"]
        assert len(model.prefills) == eng.last_stats["prefill_forwards"]


def test_prompt_routing_holds_the_common_prefix_once(text):
    """The KV tokens the shared cache's buffers hold are each item's common prompt once, each
    mode's remainder once and every row's response budget; the dense cache holds rows x the
    longest prompt + budget.  Samples and log-probs are the same."""
    items = text.items[:2]
    reqs = _bpo_groups(text, items, g=3, routing=("prompt",))
    held = {}
    outs = {}
    for share in (True, False):
        model = Counting(text.model)
        eng = _engine(model, text, share_prompts=share)
        outs[share] = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(12))
        assert len(model.caches) == 1
        held[share] = _held(text, model.caches[0])
        assert eng.last_stats["kv_tokens_peak"] == held[share]
        assert isinstance(model.caches[0], SharedKVCache) == share
    _assert_same(outs[True], outs[False])
    auto = [text.tpl.prompt_ids(it.question, 0, "auto") for it in items]
    remainders = len(text.tpl.forced_ids("think")) + len(text.tpl.forced_ids("no_think"))
    budgets = sum(_budget(r) for r in reqs)
    common = _prefix_tokens([RolloutRequest(prompt_ids=p, mode="auto") for p in auto], None)
    assert held[True] == common + len(items) * remainders + budgets
    assert held[False] == len(reqs) * max(len(r.prompt_ids) + _budget(r) for r in reqs)
    assert held[True] < held[False] / 2


def test_kv_budget_that_fits_only_with_the_prefix_counted_once(text):
    """A budget equal to the shared cache of the whole batch runs it in one wave, with the
    samples of the unbounded run; per-row it needs several waves (same samples again)."""
    reqs = _bpo_groups(text, text.items[:2], g=2)
    free = _engine(text.model, text)
    want = free.generate(reqs, PARAMS, torch.Generator().manual_seed(5))
    budget = _prefix_tokens(reqs, None) + sum(_budget(r) for r in reqs)
    assert free.last_stats["kv_tokens_peak"] == budget
    dense = len(reqs) * max(len(r.prompt_ids) + _budget(r) for r in reqs)
    assert budget < dense
    a, b, st, ref = _run_both(text.model, text, reqs, seed=5, kv_budget_tokens=budget)
    assert st["waves"] == 1 and st["kv_tokens_peak"] == budget
    assert ref["waves"] >= 2 and ref["kv_tokens_peak"] <= budget
    _assert_same(a, want)
    _assert_same(a, b)
    with pytest.raises(ValueError, match=r"requests\[\d+\] needs \d+ KV-cache tokens"):
        _engine(text.model, text, kv_budget_tokens=budget // 20).generate(reqs, PARAMS)


def test_prefill_token_budget_and_kv_waves_with_sharing(text):
    """Sharing composes with the prefill token budget (several forwards per node shape) and
    with KV waves (each wave holds its own prompt tree, within the budget)."""
    reqs = _bpo_groups(text, text.items[:2], g=2)
    free = _engine(text.model, text)
    want = free.generate(reqs, PARAMS, torch.Generator().manual_seed(3))
    budget = free.last_stats["kv_tokens_peak"] // 3
    for kw in ({"prefill_tokens": 1}, {"kv_budget_tokens": budget}):
        model = Counting(text.model)
        eng = _engine(model, text, **kw)
        got = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(3))
        _assert_same(got, want)
        assert _distinct(reqs) <= eng.last_stats["distinct_prompts"] < len(reqs)
        assert eng.last_stats["kv_tokens_peak"] == max(_held(text, c) for c in model.caches)
        if "kv_budget_tokens" in kw:
            assert len(model.caches) == eng.last_stats["waves"] >= 3
            assert max(_held(text, c) for c in model.caches) <= budget
        else:  # one node per forward
            assert eng.last_stats["prefill_forwards"] == eng.last_stats["prefix_nodes"]
            assert len(model.prefills) == eng.last_stats["prefix_nodes"]


# ---------------------------------------------------------------- the prompt tree
def test_prompt_tree_nodes_and_sharing_rules():
    P = 6  # image placeholder id
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3], [1, 2, 7], [9], [1, 2, 3, 4],
               [1, P, P, 2, 8], [1, P, P, 2, 9], [1, P, P, 3], [1, P, P, 2, 8]]
    reqs = [RolloutRequest(prompt_ids=p, mode="auto") for p in prompts]
    classes = [None] * 6 + [0, 0, 0, 1]  # the last prompt has other images
    groups = [[0, 5], [1], [2], [3], [4], [6], [7], [8], [9]]
    nodes, ends = prompt_tree(reqs, groups, classes, image_token_id=P)
    path: list[tuple] = []  # each node's whole prefix, from its root
    for n in nodes:
        assert n.parent < len(path)  # parents come first
        seg = tuple(prompts[n.row][n.start:n.end])
        up = () if n.parent < 0 else path[n.parent]
        assert n.start == len(up) and n.depth == (0 if n.parent < 0 else nodes[n.parent].depth + 1)
        path.append(up + seg)
    edges = sorted((path[j], () if n.parent < 0 else path[n.parent], nodes[j].ends)
                   for j, n in enumerate(nodes))
    assert edges == sorted([
        # text: [1 2] -> [3] -> {[4], [5 6]}, [1 2] -> [7]; [9] alone
        ((1, 2), (), []), ((1, 2, 3), (1, 2), [2]), ((1, 2, 3, 4), (1, 2, 3), [0]),
        ((1, 2, 3, 5, 6), (1, 2, 3), [1]), ((1, 2, 7), (1, 2), [3]), ((9,), (), [4]),
        # one image class, equal through the last placeholder: [1 P P] -> [2] -> {[8], [9]},
        # [1 P P] -> [3]; the same tokens with other images: a root of their own
        ((1, P, P), (), []), ((1, P, P, 2), (1, P, P), []),
        ((1, P, P, 2, 8), (1, P, P, 2), [5]), ((1, P, P, 2, 9), (1, P, P, 2), [6]),
        ((1, P, P, 3), (1, P, P), [7]), ((1, P, P, 2, 8), (), [8])])
    assert [path[ends[gi]] for gi in range(len(groups))] == [tuple(prompts[g[0]]) for g in groups]
    for n in nodes:  # every placeholder of an image prompt lies in a root
        assert n.parent == -1 or classes[n.row] is None or P not in prompts[n.row][n.start:n.end]
    # the tokens held are the distinct prefixes within a bucket
    text_pref = {tuple(p[:k]) for p in prompts[:6] for k in range(1, len(p) + 1)}
    img_pref = {tuple(p[:k]) for p in prompts[6:9] for k in range(1, len(p) + 1)}
    assert sum(n.end - n.start for n in nodes) == len(text_pref) + len(img_pref) + len(prompts[9])


def test_image_prompts_share_only_through_their_last_placeholder(vision):
    it = vision.items[0]
    tpl, P = vision.tpl, vision.cfg.image_token_id
    base = tpl.prompt_ids(it.question, 1, "auto")
    first = base.index(P)
    # the image one token later: the prompts agree before it, not through its placeholders
    moved = base[:first] + [base[first - 1]] + base[first:]
    img = np.stack(it.images)
    reqs = [RolloutRequest(prompt_ids=base, mode="auto", images=img),
            RolloutRequest(prompt_ids=moved, mode="auto", images=img)]
    images = [_as_images(r.images, i, vision.cfg) for i, r in enumerate(reqs)]
    nodes, _ = prompt_tree(reqs, [[0], [1]], image_classes(images), image_token_id=P)
    assert [(n.parent, n.end - n.start) for n in nodes] == [(-1, len(base)), (-1, len(moved))]
    a, b, st, _ = _run_both(vision.model, vision, reqs, seed=1)
    _assert_same(a, b)
    assert st["prefill_tokens"] == len(base) + len(moved) and st["prefill_images"] == 2


# ---------------------------------------------------------------- the shared cache
def _reference_attention(q, keys, vals, scale):
    """Softmax attention of ``q [s, Hq, D]`` over ``keys, vals [L, Hk, D]`` with the last
    ``s`` keys the queries' own (causal), in fp64."""
    s, hq, _ = q.shape
    L, hk = keys.shape[0], keys.shape[1]
    k = keys.double().repeat_interleave(hq // hk, dim=1)
    v = vals.double().repeat_interleave(hq // hk, dim=1)
    sc = torch.einsum("shd,lhd->hsl", q.double(), k) * scale
    vis = torch.arange(L)[None, :] <= (L - s + torch.arange(s))[:, None]
    sc = sc.masked_fill(~vis[None], float("-inf"))
    return torch.einsum("hsl,lhd->shd", torch.softmax(sc, -1), v)


@pytest.mark.parametrize("hq,hk,s", [(4, 2, 1), (3, 3, 3), (8, 2, 2)])
def test_shared_cached_attention_matches_softmax_over_the_whole_sequence(hq, hk, s):
    torch.manual_seed(hq * 10 + s)
    d, scale = 8, 8 ** -0.5
    # nodes: 0 (5) -> 1 (3), 0 -> 2 (1), 3 (4) alone; rows continue 1, 1, 2, 0, 3 and none
    tree = PrefixTree(node_lengths=[5, 3, 1, 4], node_parents=[-1, 0, 0, -1],
                      row_nodes=[1, 1, 2, 0, 3, -1], row_tokens=[7, 7, 7, 7, 7, 7])
    c = SharedKVCache(tree, num_layers=1, kv_heads=hk, head_dim=d, dtype=torch.float32,
                      device=torch.device("cpu"))
    assert c.held_tokens == 5 + 3 + 1 + 4 + 6 * 7 == held_tokens(c, hk, d)
    seqs = {}  # slot -> (keys, values) of its whole sequence so far, kept independently

    def append(view, ids, n, key):
        step = view.plan(torch.tensor(ids), n)
        b = len(ids)
        q = torch.randn(b * n, hq, d)
        kn, vn = torch.randn(b * n, hk, d), torch.randn(b * n, hk, d)
        out = step.attend(q, kn, vn, c.k[0], c.v[0], scale)
        view.advance(step)
        for j, i in enumerate(ids):
            k0, v0 = seqs.get(key(i), (torch.zeros(0, hk, d), torch.zeros(0, hk, d)))
            k1 = torch.cat([k0, kn[j * n:(j + 1) * n]])
            v1 = torch.cat([v0, vn[j * n:(j + 1) * n]])
            seqs[key(i)] = (k1, v1)
            want = _reference_attention(q[j * n:(j + 1) * n], k1, v1, scale)
            torch.testing.assert_close(out[j * n:(j + 1) * n].double(), want, atol=1e-5, rtol=1e-5)
            assert step.positions[j].tolist() == list(range(k1.shape[0] - n, k1.shape[0]))

    node = lambda i: ("node", i)  # noqa: E731
    append(c.nodes, [0, 3], 1, node)  # roots, in two pieces of unequal count
    append(c.nodes, [0], 4, node)
    append(c.nodes, [3], 3, node)
    for j, p in ((1, 0), (2, 0)):  # children start from a copy of their parent's sequence
        seqs[node(j)] = seqs[node(p)]
    append(c.nodes, [1], 3, node)
    append(c.nodes, [2], 1, node)
    for r, j in enumerate(tree.row_nodes):
        if j >= 0:
            seqs[("row", r)] = seqs[node(j)]
    row = lambda i: ("row", i)  # noqa: E731
    append(c, [0, 1, 2, 3, 4, 5], s, row)
    append(c, [4, 1, 5], s, row)  # a subset, out of order
    assert c.row_lengths().tolist() == [8 + s, 8 + 2 * s, 6 + s, 5 + s, 4 + 2 * s, 2 * s]


def test_shared_cache_errors_name_the_field():
    cases = [(dict(node_lengths=[2, 0], node_parents=[-1, 0], row_nodes=[1], row_tokens=[3]),
              r"node_lengths\[1\] must be an int >= 1, got 0"),
             (dict(node_lengths=[2, 2], node_parents=[-1, 1], row_nodes=[1], row_tokens=[3]),
              r"node_parents\[1\] must name an earlier node \(< 1\) or -1, got 1"),
             (dict(node_lengths=[2], node_parents=[-1, -1], row_nodes=[0], row_tokens=[3]),
              r"node_parents must have one entry per node \(1\), got 2"),
             (dict(node_lengths=[2], node_parents=[-1], row_nodes=[2], row_tokens=[3]),
              r"row_nodes\[0\] must be -1 or a node in \[0, 1\), got 2"),
             (dict(node_lengths=[2], node_parents=[-1], row_nodes=[0], row_tokens=[True]),
              r"row_tokens\[0\] must be an int >= 1, got True"),
             (dict(node_lengths=[2], node_parents=[-1], row_nodes=[], row_tokens=[]),
              "row_tokens must describe at least one row")]
    for kw, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            PrefixTree(**kw)
    tree = PrefixTree(node_lengths=[2, 1], node_parents=[-1, 0], row_nodes=[1, 0],
                      row_tokens=[2, 3])
    c = SharedKVCache(tree, num_layers=1, kv_heads=1, head_dim=2, dtype=torch.float32,
                      device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"row 0 continues nodes that are not fully written "
                                         r"\(node, tokens, length\) \[\(0, 0, 2\), \(1, 0, 1\)\]"):
        c.plan(torch.tensor([0]), 1)
    with pytest.raises(ValueError, match=r"node 1 continues nodes .* \[\(0, 0, 2\)\]"):
        c.nodes.plan(torch.tensor([1]), 1)
    with pytest.raises(ValueError, match=r"KV cache overflow: \(node, own tokens after append, "
                                         r"capacity\) \[\(0, 3, 2\)\]"):
        c.nodes.plan(torch.tensor([0]), 3)
    with pytest.raises(ValueError, match=r"cache_rows must lie in \[0, 2\), got \[2\]"):
        c.plan(torch.tensor([2]), 1)
    with pytest.raises(ValueError, match="cache_rows must not repeat a row"):
        c.plan(torch.tensor([1, 1]), 1)
    with pytest.raises(TypeError, match="tree must be a PrefixTree"):
        SharedKVCache({}, num_layers=1, kv_heads=1, head_dim=2, dtype=torch.float32,
                      device=torch.device("cpu"))


def test_model_shared_cache_checks_its_tree(text):
    tree = PrefixTree(node_lengths=[30], node_parents=[-1], row_nodes=[0], row_tokens=[10])
    with pytest.raises(ValueError, match=r"prefix_tree describes 1 rows, expected batch_size=2"):
        text.model.new_kv_cache(2, 64, prefix_tree=tree)
    with pytest.raises(ValueError, match=r"prefix_tree reaches 40 tokens in a row .* more than "
                                         r"max_seqlen=32"):
        text.model.new_kv_cache(1, 32, prefix_tree=tree)
    c = text.model.new_kv_cache(1, 40, prefix_tree=tree)
    with pytest.raises(ValueError, match="row 0 continues nodes that are not fully written"):
        text.model(input_ids=torch.tensor([[1]]), kv_cache=c)


def test_share_prompts_flag_is_checked(text):
    with pytest.raises(ValueError, match="share_prompts must be a bool, got 'yes'"):
        EmbeddedEngine(text.model, stop_ids=[1], share_prompts="yes")
    with pytest.raises(ValueError, match=r"images must hold one entry per request \(2\), got 1"):
        prompt_groups([RolloutRequest(prompt_ids=[1], mode="auto")] * 2, [None])


def test_rollout_config_share_prompts_reaches_the_engine(text):
    """``--setup.rollout.share_prompts`` builds the engine it names (and is checked)."""
    from r4b.components import RolloutConfig, build_engine

    class Tok:
        im_end_id, eos_id, vocab_size, image_token_id = 1, 2, 64, 63

    class Template:
        classify_mode = staticmethod(lambda ids: None)

    for share in (True, False):
        eng = build_engine(text.model, Template(), Tok(), max_seqlen=64,
                           rollout=RolloutConfig(share_prompts=share, kv_budget_tokens=500))
        assert eng.share_prompts is share and eng.kv_budget_tokens == 500
    with pytest.raises(TypeError, match="rollout.share_prompts must be true or false, got 'no'"):
        RolloutConfig(share_prompts="no")

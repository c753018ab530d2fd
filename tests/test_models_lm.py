"""Language-model behaviour on CPU: packed sequences, KV-cache decoding, pipeline stages composed
in one process, presets and input errors."""

from __future__ import annotations

import pytest
import torch

from r4b.models import KVCache, LMConfig, ModelConfig, build_model, get_preset
from r4b.models.attention import resolve_backend
from r4b.models.pipeline import stage_layer_range


def tiny_text(seed: int = 0, *, tie: bool = True, vocab: int = 64, layers: int = 4):
    cfg = ModelConfig(lm=LMConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                  num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16,
                                  max_position_embeddings=48, tie_word_embeddings=tie))
    torch.manual_seed(seed)
    model = build_model(cfg)
    # norm scales away from 1 so that every weight matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _pack(seqs):
    ids = torch.cat(seqs)
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    pos = torch.cat([torch.arange(n) for n in lens.tolist()])
    return ids, cu, pos, int(lens.max())


def test_packed_equals_each_sequence_alone():
    model = tiny_text(1).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 64, (n,), generator=g) for n in (5, 1, 12, 7)]
    ids, cu, pos, mx = _pack(seqs)
    with torch.no_grad():
        packed = model(input_ids=ids, cu_seqlens=cu, position_ids=pos, max_seqlen=mx)
        default_pos = model(input_ids=ids, cu_seqlens=cu)  # positions derived from cu_seqlens
        assert packed.shape == (ids.numel(), 64)
        torch.testing.assert_close(default_pos, packed, rtol=0, atol=0)
        for i, s in enumerate(seqs):
            alone = model(input_ids=s[None])[0]
            torch.testing.assert_close(packed[cu[i]:cu[i + 1]], alone, rtol=1e-5, atol=1e-5)


def test_packed_gradients_do_not_cross_sequences():
    model = tiny_text(2)
    seqs = [torch.randint(0, 64, (n,)) for n in (6, 9)]
    ids, cu, pos, mx = _pack(seqs)
    emb = model.language_model.embed_tokens
    captured = {}

    def keep(module, inputs, out):
        out.retain_grad()
        captured["x"] = out

    h = emb.register_forward_hook(keep)
    out = model(input_ids=ids, cu_seqlens=cu, position_ids=pos, max_seqlen=mx, return_hidden=True)
    h.remove()
    assert out.shape == (15, 64)
    out[3].sum().backward()  # a token of the first sequence
    g = captured["x"].grad
    assert g[:4].abs().sum() > 0 and g[4:].abs().sum() == 0  # only itself and earlier tokens


def test_batch_and_packed_layouts_agree():
    model = tiny_text(3).eval()
    ids = torch.randint(0, 64, (3, 10))
    cu = torch.arange(0, 31, 10, dtype=torch.int32)
    with torch.no_grad():
        a = model(input_ids=ids)
        b = model(input_ids=ids.reshape(-1), cu_seqlens=cu)
    torch.testing.assert_close(a.reshape(30, -1), b, rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_matches_full_forward_with_ragged_rows():
    model = tiny_text(4).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (n,), generator=g) for n in (5, 3, 7)]
    steps = [4, 2, 5]  # decode steps per row: rows finish at different times
    cache = model.new_kv_cache(3, 24)
    assert isinstance(cache, KVCache) and cache.lengths.tolist() == [0, 0, 0]
    seqs = [p.clone() for p in prompts]
    last = {}
    with torch.no_grad():
        for i, p in enumerate(prompts):  # prefill one request at a time
            logits = model(input_ids=p[None], kv_cache=cache, cache_rows=torch.tensor([i]))
            assert logits.shape == (1, len(p), 64)
            full = model(input_ids=p[None])
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
            last[i] = logits[0, -1]
        for t in range(max(steps)):
            active = [i for i in range(3) if t < steps[i]]
            nxt = torch.stack([last[i].argmax() for i in active])
            for j, i in enumerate(active):
                seqs[i] = torch.cat([seqs[i], nxt[j:j + 1]])
            logits = model(input_ids=nxt[:, None], kv_cache=cache, cache_rows=torch.tensor(active))
            assert logits.shape == (len(active), 1, 64)
            for j, i in enumerate(active):
                full = model(input_ids=seqs[i][None])[0, -1]
                torch.testing.assert_close(logits[j, 0], full, rtol=1e-5, atol=1e-5)
                last[i] = logits[j, 0]
    assert cache.lengths.tolist() == [len(s) for s in seqs]


def test_kv_cache_batched_prefill_of_equal_lengths_and_overflow():
    model = tiny_text(6).eval()
    cache = model.new_kv_cache(2, 8)
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        a = model(input_ids=ids, kv_cache=cache)  # default: all rows
        torch.testing.assert_close(a, model(input_ids=ids), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="KV cache overflow"):
            model(input_ids=ids[:, :3], kv_cache=cache)
        with pytest.raises(ValueError, match="cache_rows must lie in"):
            model(input_ids=ids[:1, :1], kv_cache=cache, cache_rows=torch.tensor([2]))
    assert cache.lengths.tolist() == [6, 6]


def test_sequence_longer_than_position_limit_raises():
    model = tiny_text(7)
    with pytest.raises(ValueError, match="exceeds lm.max_position_embeddings=48"):
        model(input_ids=torch.zeros(1, 49, dtype=torch.long))
    ids, cu, pos, mx = _pack([torch.zeros(49, dtype=torch.long), torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match="more than lm.max_position_embeddings=48"):
        model(input_ids=ids, cu_seqlens=cu, position_ids=pos)
    with pytest.raises(ValueError, match="max_seqlen 64 exceeds"):
        model.new_kv_cache(1, 64)


def test_bad_inputs_raise_named_errors():
    model = tiny_text(8)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 64\)"):
        model(input_ids=torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="cu_seqlens\\[-1\\]=5 must equal"):
        model(input_ids=torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="images were given but this model is text-only"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), images=torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_pipeline_stages_composed_match_unsplit_model(tie):
    full = tiny_text(9, tie=tie)
    sd = full.language_model.hf_state_dict()
    stages = []
    for rank in range(2):
        lo, hi = stage_layer_range(4, rank, 2)
        stage = build_model(full.cfg, pre_process=rank == 0, post_process=rank == 1, layer_range=(lo, hi))
        stage.language_model.load_hf_state_dict(sd, strict=True)
        stages.append(stage)
    assert [len(s.language_model.layers) for s in stages] == [2, 2]
    seqs = [torch.randint(0, 64, (n,)) for n in (4, 9, 6)]
    ids, cu, pos, mx = _pack(seqs)
    kw = dict(cu_seqlens=cu, position_ids=pos, max_seqlen=mx)
    want = full(input_ids=ids, **kw)
    mid = stages[0](input_ids=ids, **kw)
    assert mid.shape == (ids.numel(), 1, 64)
    recv = mid.detach().requires_grad_()  # what the next stage receives over p2p
    stages[1].set_input_tensor([recv])
    got = stages[1](input_ids=ids, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # backward: last stage, then the first stage with the received gradient
    gout = torch.randn_like(want)
    want.backward(gout)
    got.backward(gout)
    mid.backward(recv.grad)
    flm, s0, s1 = full.language_model, stages[0].language_model, stages[1].language_model
    for j in range(4):
        src = s0.layers[j] if j < 2 else s1.layers[j - 2]
        for (n, p), q in zip(flm.layers[j].named_parameters(), src.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    head_grad = s1.lm_head.weight.grad
    if tie:  # the embedding gradient is split between the embedding and its head copy
        torch.testing.assert_close(s0.embed_tokens.weight.grad + head_grad,
                                   flm.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)
    else:
        torch.testing.assert_close(head_grad, flm.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s0.embed_tokens.weight.grad, flm.embed_tokens.weight.grad,
                                   rtol=1e-4, atol=1e-6)
    # a plain [B, S] batch travels the same way
    ids2 = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        stages[1].set_input_tensor(stages[0](input_ids=ids2))
        torch.testing.assert_close(stages[1](input_ids=ids2), full(input_ids=ids2), rtol=1e-5, atol=1e-5)


def test_stage_layer_range_covers_all_layers():
    for n, p in ((4, 2), (7, 3), (36, 4), (5, 5)):
        ranges = [stage_layer_range(n, r, p) for r in range(p)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
    with pytest.raises(ValueError, match="num_layers"):
        stage_layer_range(2, 0, 3)


def test_hidden_output_and_lm_head_weight_give_logits():
    model = tiny_text(10, tie=False)
    ids = torch.randint(0, 64, (2, 6))
    h = model(input_ids=ids, return_hidden=True)
    logits = model(input_ids=ids)
    w = model.lm_head_weight()
    assert w.shape == (64, 64) and model.vocab_start == 0 and model.vocab_size == 64
    torch.testing.assert_close(h @ w.t(), logits, rtol=1e-5, atol=1e-5)


def test_presets():
    tiny = get_preset("tiny", vocab_size=300)
    assert tiny.lm.vocab_size == 300 and tiny.lm.hidden_size == 128 and tiny.lm.num_layers == 4
    assert tiny.vision is not None and tiny.image_token_id == 299 and tiny.tokens_per_image == 16
    assert get_preset("tiny", vocab_size=300, vision=False).vision is None
    with pytest.raises(ValueError, match="preset must be one of"):
        get_preset("huge")
    with pytest.raises(ValueError, match="lm.num_heads \\(6\\) must be a multiple of lm.num_kv_heads \\(4\\)"):
        LMConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 2; pad the vocabulary to 302"):
        LMConfig(vocab_size=301).check_tp(2)


def test_r4b_4b_preset():
    big = get_preset("r4b-4b")
    lm = big.lm
    assert (lm.hidden_size, lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.head_dim) == (2560, 36, 32, 8, 128)
    assert (lm.intermediate_size, lm.vocab_size, lm.rope_theta, lm.tie_word_embeddings) == (9728, 151936, 1e6, True)
    assert lm.max_position_embeddings == 40960
    assert big.vision.hidden_size == 1152 and big.vision.tokens_per_image == 729


def test_attention_backend_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == "sdpa"
    assert resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"
    with pytest.raises((ValueError, ImportError)):
        resolve_backend("torch_varlen", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        resolve_backend("xformers", cpu, torch.float32)


def test_bf16_forward_runs_close_to_fp32():
    model = tiny_text(11)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        ref = model(input_ids=ids)
        model16 = model.to(torch.bfloat16)
        out = model16(input_ids=ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.gpu
def test_fused_gpu_paths_match_references():
    from r4b.models import layers

    dev = torch.device("cuda")
    x = torch.randn(37, 4, 32, device=dev, dtype=torch.bfloat16)
    w = torch.rand(32, device=dev, dtype=torch.bfloat16) + 0.5
    ref = layers.rms_norm_reference(x.float(), w.float(), 1e-6)
    torch.testing.assert_close(layers.rms_norm(x, w, 1e-6).float(), ref, rtol=2e-2, atol=2e-2)
    k = torch.randn(37, 2, 32, device=dev, dtype=torch.bfloat16)
    cos, sin = layers.RotaryEmbedding(32, 1e4)(torch.arange(37, device=dev))
    # The reference is computed from copies taken before the call, and the call must leave its
    # inputs untouched (Liger's rope kernel rotates in place; apply_rotary must not let it).
    x_before, k_before = x.clone(), k.clone()
    q0, k0 = layers.apply_rotary_reference(x_before.float(), k_before.float(), cos, sin)
    q1, k1 = layers.apply_rotary(x, k, cos, sin)
    assert torch.equal(x, x_before) and torch.equal(k, k_before), "apply_rotary modified its inputs"
    torch.testing.assert_close(q1.float(), q0, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(k1.float(), k0, rtol=2e-2, atol=2e-2)
    g, u = torch.randn(2, 37, 96, device=dev, dtype=torch.bfloat16)
    torch.testing.assert_close(layers.swiglu(g, u).float(), (torch.nn.functional.silu(g.float()) * u.float()),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_varlen_backend_matches_sdpa():
    import dataclasses

    model = tiny_text(12).cuda().to(torch.bfloat16).eval()
    seqs = [torch.randint(0, 64, (n,)) for n in (5, 17, 9)]
    ids, cu, pos, mx = (t.cuda() if torch.is_tensor(t) else t for t in _pack(seqs))
    with torch.no_grad():
        fast = model(input_ids=ids, cu_seqlens=cu, position_ids=pos, max_seqlen=mx)
        model.cfg = dataclasses.replace(model.cfg, attention_backend="sdpa")
        ref = model(input_ids=ids, cu_seqlens=cu, position_ids=pos, max_seqlen=mx)
    assert (fast.float() - ref.float()).abs().max() < 5e-2 * ref.float().abs().max()


@pytest.mark.gpu
def test_megatron_schedule_runs_the_forward_step_on_gpu():
    from r4b.models.pipeline import make_forward_step, run_pipeline

    model = tiny_text(13).cuda()
    seqs = [torch.randint(0, 64, (n,)) for n in (6, 10)]
    ids, cu, pos, mx = (t.cuda() if torch.is_tensor(t) else t for t in _pack(seqs))
    batch = {"input_ids": ids, "cu_seqlens": cu, "position_ids": pos, "max_seqlen": mx}

    def loss_fn(hidden, b):
        loss = hidden.float().pow(2).mean()
        return loss, {"loss": loss.detach()}

    step = make_forward_step(loss_fn)
    metrics = run_pipeline(model, iter([batch, batch]), num_microbatches=2,
                           tokens_per_microbatch=int(ids.numel()), forward_step=step)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    direct = model(**batch, return_hidden=True).float().pow(2).mean()
    direct.backward()
    assert len(metrics) == 2
    torch.testing.assert_close(metrics[0]["loss"], direct.detach(), rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):  # two micro-batches of 1/2 each = one direct pass
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)

"""The vLLM rollout engine's wiring and contract, on CPU, against ``tests/vllm_standin`` (a
stand-in ``vllm`` package backed by a real r4b model; it rejects keywords vLLM does not take).

Nothing here runs real vLLM or a GPU (see ``r4b.rollout.vllm_engine``'s docstring)."""

import dataclasses
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from r4b import components
from r4b.components import (ModelChoice, RolloutConfig, build_engine, default_task, make_template,
                            make_tokenizer, model_config)
from r4b.data import TaskConfig, make_task
from r4b.models import build_model
from r4b.models.hf import model_hf_state_dict
from r4b.rl.bpo import BPOTrainer, build_requests, sampling_params
from r4b.rl.config import RLConfig
from r4b.rollout import EmbeddedEngine, RolloutRequest, SamplingParams
from r4b.rollout import vllm_engine
from r4b.rollout.sampling import truncated_logits
from r4b.runtime import init_runtime

REAL_DEVICE_CHECK = components._vllm_device
STANDIN = Path(__file__).resolve().parent / "vllm_standin"
GREEDY = SamplingParams(greedy=True, max_new_tokens_think=10, max_new_tokens_no_think=6,
                        max_new_tokens_auto=8)


@pytest.fixture(scope="module")
def rt():
    return init_runtime(1)


@pytest.fixture(scope="module")
def env(rt):
    tok = make_tokenizer(ModelChoice())
    task = TaskConfig(vision=False)
    cfg = model_config(ModelChoice(), tok, task)
    # An LM head padded past the tokenizer's ids: the engine must never draw the padding.
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=128))
    tpl = make_template(tok, cfg)
    items = make_task(0, 8, config=task)
    return SimpleNamespace(tok=tok, cfg=cfg, tpl=tpl, items=items, task=task)


def _model(env, seed):
    torch.manual_seed(seed)
    return build_model(env.cfg).eval()


VERSIONS = ("0.10.2", "0.34.0")  # the stand-in's modes: the supported range's two ends
BOTH = pytest.mark.parametrize("vllm", VERSIONS, indirect=True)


@pytest.fixture
def vllm(monkeypatch, request):
    """The stand-in importable as ``vllm`` (this test only; as vLLM ``request.param``, default
    the newest), torchrun's rank variables set, the device check off (the model is on the CPU
    here)."""
    monkeypatch.setenv("R4B_VLLM_STANDIN_VERSION", getattr(request, "param", VERSIONS[-1]))
    monkeypatch.syspath_prepend(str(STANDIN))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                 ("VLLM_ENABLE_V1_MULTIPROCESSING", "1")):
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(components, "_vllm_device", lambda model: torch.device("cpu"))
    import vllm as standin

    assert standin.__version__ == getattr(request, "param", VERSIONS[-1]) + "+r4b.standin"
    yield standin
    vllm_engine.release_colocated_engine()
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


def _vllm_rollout(**kw):
    return RolloutConfig(engine="vllm", **kw)


def _embedded(model, env, max_seqlen=4096):
    return EmbeddedEngine(model, stop_ids=[env.tok.im_end_id, env.tok.eos_id],
                          mode_classifier=env.tpl.classify_mode, max_seqlen=max_seqlen,
                          vocab_limit=env.tok.vocab_size, banned_ids=[env.tok.image_token_id])


def _requests(env, n_items=3):
    """Prompt-routing and token-routing requests of every mode."""
    reqs = []
    for k, it in enumerate(env.items[:n_items]):
        auto = env.tpl.prompt_ids(it.question, 0, "auto")
        for m in ("think", "no_think", "auto"):
            reqs.append(RolloutRequest(prompt_ids=env.tpl.prompt_ids(it.question, 0, m), mode=m,
                                       uid=(k, m, "prompt")))
            reqs.append(RolloutRequest(prompt_ids=auto, mode=m, forced_ids=env.tpl.forced_ids(m),
                                       uid=(k, m, "token")))
    return reqs


def _full_logits(model, r) -> torch.Tensor:
    """Logits at each response position, from one non-cached forward."""
    ids = torch.tensor([list(r.request.prompt_ids) + r.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids)[0].float()
    n = len(r.request.prompt_ids)
    return logits[n - 1:-1]


def _tensors(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _standin_state(eng):
    return _tensors(eng.llm.model.inner.state_dict())


def _same_state(a: dict, b: dict) -> bool:
    a, b = _tensors(a), _tensors(b)
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


# ---------------------------------------------------------------- configuration
def test_engine_choice_is_validated_and_missing_vllm_is_reported_at_parse_time(capsys):
    with pytest.raises(ValueError, match=r"rollout\.engine must be one of \('embedded', 'vllm'\)"):
        RolloutConfig(engine="sglang")
    with pytest.raises(ValueError, match=r"rollout\.vllm_sleep_level"):
        RolloutConfig(vllm_sleep_level=3)
    with pytest.raises(ValueError, match=r"rollout\.vllm_gpu_memory_utilization"):
        RolloutConfig(vllm_gpu_memory_utilization=0.0)
    assert RolloutConfig().engine == "embedded"
    if vllm_engine.vllm_available():
        pytest.skip("vLLM is importable here: the missing-vLLM error cannot be shown")
    with pytest.raises(ImportError, match=r"pip install 'r4b\[gpu\]'") as e:
        RolloutConfig(engine="vllm")
    assert isinstance(e.value, vllm_engine.VLLMMissing)
    # The main job's command line fails on it before any work.
    from r4b.config import parse_cli
    from r4b.pretrain_bpo import BPOJob

    with pytest.raises(SystemExit):
        parse_cli(BPOJob, ["--setup.rollout.engine", "vllm"])
    out = capsys.readouterr()
    assert "r4b[gpu]" in out.out + out.err, out


def test_vllm_on_a_cpu_model_names_the_field(vllm, env, monkeypatch):
    monkeypatch.setattr(components, "_vllm_device", REAL_DEVICE_CHECK)
    model = _model(env, 0)
    with pytest.raises(ValueError, match=r"rollout\.engine 'vllm' needs the model on a CUDA device"):
        build_engine(model, env.tpl, env.tok, max_seqlen=256, rollout=_vllm_rollout())


def test_every_llm_keyword_is_one_vllm_accepts(vllm, env, tmp_path):
    model = _model(env, 0)
    eng = build_engine(model, env.tpl, env.tok, max_seqlen=256,
                       rollout=_vllm_rollout(vllm_gpu_memory_utilization=0.3, vllm_sleep_level=2))
    assert isinstance(eng, vllm_engine.VLLMEngine) and eng.model is model
    kw = eng.llm.kwargs
    assert set(kw) <= vllm.ACCEPTED_LLM_KWARGS, set(kw) - vllm.ACCEPTED_LLM_KWARGS
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["enable_sleep_mode"] is True and kw["load_format"] == "dummy"
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["tensor_parallel_size"] == 1 and kw["gpu_memory_utilization"] == 0.3
    assert kw["max_model_len"] == env.cfg.lm.max_position_embeddings
    assert kw["dtype"] == env.cfg.params_dtype and kw["skip_tokenizer_init"] is True
    assert "data_parallel_size" not in kw  # vLLM rejects offline DP for dense models
    assert eng.sleep_level == 2
    # vLLM's external launcher turns its multiprocessing off (the stand-in does as vLLM does).
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # Only a config.json (and tokenizer files): no checkpoint on disk.
    files = sorted(p.name for p in Path(kw["model"]).iterdir())
    assert files == ["config.json"], files
    # The stand-in's keyword check is not vacuous.
    with pytest.raises(TypeError, match="unexpected keyword"):
        vllm.LLM(model=kw["model"], skip_tokenizer_init=True, load_format="dummy", no_such_arg=1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        vllm.SamplingParams(temperature=1.0, top_q=0.5)
    eng.generate(_requests(env, 1), GREEDY)
    for sp in eng.llm.params_seen[-1]:
        assert set(sp.kwargs) <= vllm.ACCEPTED_SAMPLING_KWARGS


# ---------------------------------------------------------------- weights
def test_synced_weights_reach_the_generating_model_and_greedy_matches_embedded(vllm, env):
    a, b = _model(env, 1), _model(env, 2)
    reqs = _requests(env, 3)
    eng = build_engine(a, env.tpl, env.tok, max_seqlen=256, rollout=_vllm_rollout())
    # The engine's model holds a's weights, pushed under checkpoint names (all of them).
    assert _same_state(_standin_state(eng), a.state_dict())
    assert eng.llm.model.load_calls[-1] == sorted(model_hf_state_dict(a))
    got_a = eng.generate(reqs, GREEDY)
    want_a = _embedded(a, env).generate(reqs, GREEDY)
    assert [r.response_ids for r in got_a] == [r.response_ids for r in want_a]
    assert [r.finished for r in got_a] == [r.finished for r in want_a]
    assert [r.mode_chosen for r in got_a] == [r.mode_chosen for r in want_a]
    for g, w in zip(got_a, want_a):
        # greedy at temperature 1: vLLM's processed log-probs are the truncated distribution's
        torch.testing.assert_close(torch.tensor(g.behaviour_logprobs), torch.tensor(w.behaviour_logprobs),
                                   atol=1e-5, rtol=0)
    assert max(t for r in got_a for t in r.response_ids) < env.tok.vocab_size  # no padding ids
    # Another policy: generation changes, and matches the embedded engine on it.
    t = eng.sync_weights(b)
    assert t >= 0 and eng.model is b
    assert _same_state(_standin_state(eng), b.state_dict())
    got_b = eng.generate(reqs, GREEDY)
    want_b = _embedded(b, env).generate(reqs, GREEDY)
    assert [r.response_ids for r in got_b] == [r.response_ids for r in want_b]
    diff = max(abs(x - y) for ra, rb in zip(got_a, got_b)
               for x, y in zip(ra.behaviour_logprobs, rb.behaviour_logprobs))
    assert diff > 1e-3, diff
    sample = dataclasses.replace(GREEDY, greedy=False)
    s_b = eng.generate(reqs, sample, torch.Generator().manual_seed(4))
    eng.sync_weights(a)
    s_a = eng.generate(reqs, sample, torch.Generator().manual_seed(4))
    assert [r.response_ids for r in s_a] != [r.response_ids for r in s_b]
    eng.sync_weights(b)
    assert [r.response_ids for r in eng.generate(reqs, sample, torch.Generator().manual_seed(4))] \
        == [r.response_ids for r in s_b]
    assert ("reset_prefix_cache",) in eng.llm.calls[-3:]
    # A module of another network is refused.
    other = dataclasses.replace(env.cfg, lm=dataclasses.replace(env.cfg.lm, num_layers=1))
    with pytest.raises(ValueError, match="does not match the engine's model config"):
        eng.sync_weights(build_model(other))


def test_a_weight_vllm_keeps_but_the_policy_lacks_is_an_error(vllm, env, monkeypatch):
    model = _model(env, 3)
    eng = build_engine(model, env.tpl, env.tok, max_seqlen=256, rollout=_vllm_rollout())
    import r4b.models.hf as hf

    real = hf.model_hf_state_dict
    monkeypatch.setattr(hf, "model_hf_state_dict",
                        lambda m: {k: v for k, v in real(m).items() if "layers.0.mlp" not in k})
    with pytest.raises(RuntimeError, match="vLLM's model kept .* parameters the policy did not provide"):
        eng.sync_weights(model)


def test_sharded_policy_and_sync_before_generating_after_an_in_place_update(vllm, env, rt):
    from r4b.training import full_state_dict, shard_model

    policy = build_model(env.cfg, init_weights=False, master_dtype=torch.float32)
    with torch.no_grad():
        policy.load_state_dict(_model(env, 4).state_dict())
    shard_model(policy, rt, compute_dtype=torch.float32)
    eng = build_engine(policy, env.tpl, env.tok, max_seqlen=256, rollout=_vllm_rollout())
    reqs = _requests(env, 2)

    def reference():
        m = build_model(env.cfg, init_weights=False).eval()
        m.load_state_dict(full_state_dict(policy))
        return _embedded(m, env).generate(reqs, GREEDY)

    assert [r.response_ids for r in eng.generate(reqs, GREEDY)] == [r.response_ids for r in reference()]
    n = len(eng.llm.calls)
    eng.generate(reqs, GREEDY)
    assert ("apply_model",) not in eng.llm.calls[n:]  # unchanged policy: no sync
    # An optimizer step by a caller that does not sync (r4b.anneal; a BPO resume's load).
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for p in policy.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert eng.weights_stale()
    n = len(eng.llm.calls)
    got = eng.generate(reqs, GREEDY)
    calls = eng.llm.calls[n:]
    assert calls.index(("apply_model",)) < calls.index(("generate", len(reqs)))
    assert not eng.weights_stale()
    assert [r.response_ids for r in got] == [r.response_ids for r in reference()]


def test_multimodal_weights_go_in_under_vllms_llava_onevision_names(vllm, env, tmp_path):
    tok = env.tok
    cfg = model_config(ModelChoice(), tok, default_task())
    with pytest.raises(ValueError, match="AnyRes"):
        vllm_engine.VLLMEngine(build_model(cfg), stop_ids=[tok.im_end_id], tokenizer_dir=tmp_path)
    # R-4B's layout at tiny widths: AnyRes, image_newline, projector pre_norm.
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_channels=3),
                              image_layout="anyres", image_newline=True,
                              image_grid_pinpoints=((18, 18), (18, 36), (36, 18), (36, 36)))
    torch.manual_seed(5)
    model = build_model(cfg).eval()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "tok" / "model.py").write_text("# remote code: copied only when trusted\n")
    eng = vllm_engine.VLLMEngine(model, stop_ids=[tok.im_end_id], max_seqlen=256,
                                 tokenizer_dir=tmp_path / "tok", work_dir=tmp_path / "engine")
    assert json.loads((tmp_path / "engine" / "config.json").read_text())["architectures"] == \
        ["RForConditionalGeneration"]
    assert sorted(p.name for p in (tmp_path / "engine").iterdir()) == ["config.json",
                                                                        "tokenizer_config.json"]
    assert eng.llm.kwargs["skip_tokenizer_init"] is False
    assert eng.llm.model.arch == "RForConditionalGeneration"
    pushed = eng.llm.model.load_calls[-1]
    prefixes = tuple(vllm.LLAVA_PREFIX_MAP)
    assert pushed and all(n.startswith(prefixes) for n in pushed), [n for n in pushed
                                                                    if not n.startswith(prefixes)]
    assert any(n.startswith("model.vision_tower.vision_model.") for n in pushed)
    assert "model.image_newline" in pushed and any(".pre_norm." in n for n in pushed)
    assert _same_state(_standin_state(eng), model.state_dict())
    eng.shutdown()


def test_one_engine_per_process_rebound_across_stages(vllm, env):
    a, b = _model(env, 6), _model(env, 7)
    first = build_engine(a, env.tpl, env.tok, max_seqlen=256, rollout=_vllm_rollout())
    second = build_engine(b, env.tpl, env.tok, max_seqlen=512, rollout=_vllm_rollout())
    assert second is first and first.model is b
    assert _same_state(_standin_state(first), b.state_dict())
    with pytest.raises(RuntimeError, match="already runs a vLLM engine"):
        build_engine(b, env.tpl, env.tok, max_seqlen=256,
                     rollout=_vllm_rollout(vllm_gpu_memory_utilization=0.25))
    other = dataclasses.replace(env.cfg, lm=dataclasses.replace(env.cfg.lm, num_layers=1))
    with pytest.raises(RuntimeError, match="already runs a vLLM engine"):
        build_engine(build_model(other), env.tpl, env.tok, max_seqlen=256, rollout=_vllm_rollout())


# ---------------------------------------------------------------- requests and log-probs
@pytest.mark.parametrize("routing", ["prompt", "token"])
@pytest.mark.parametrize("algo", ["bpo", "grpo"])
def test_forced_prefixes_per_mode_go_in_as_in_the_embedded_engine(vllm, env, routing, algo):
    model = _model(env, 8)
    eng = build_engine(model, env.tpl, env.tok, max_seqlen=256, rollout=_vllm_rollout())
    cfg = RLConfig(algo=algo, routing=routing, group_size=2, prompts_per_step=2,
                   max_new_tokens_think=10, max_new_tokens_no_think=6, max_new_tokens_auto=8)
    reqs = build_requests(env.items[:2], env.tpl, cfg, 0)
    params = sampling_params(cfg)
    out = eng.generate(reqs, params, torch.Generator().manual_seed(3))
    sent, sps = eng.llm.prompts_seen[-1], eng.llm.params_seen[-1]
    assert len(sent) == len(reqs)
    n_forced = 0
    for r, p, sp, ro in zip(reqs, sent, sps, out):
        assert p["prompt_token_ids"] == list(r.prompt_ids) + list(r.forced_ids)
        assert sp.max_tokens == params.max_new_tokens(r.mode)
        assert (sp.prompt_logprobs == 0) == bool(r.forced_ids)
        f = list(r.forced_ids)
        assert ro.response_ids[:len(f)] == f and ro.request is r
        # forced tokens: behaviour = policy = the model's log-prob (temperature 1)
        assert ro.behaviour_logprobs[:len(f)] == ro.logprobs[:len(f)]
        if f:
            n_forced += 1
            ref = torch.log_softmax(_full_logits(model, ro), -1)
            want = ref[torch.arange(len(f)), torch.tensor(f)]
            torch.testing.assert_close(torch.tensor(ro.logprobs[:len(f)]), want, atol=1e-5, rtol=0)
        if r.mode != "auto":
            assert ro.mode_chosen == r.mode
        assert len(ro.response_ids) <= params.max_new_tokens(r.mode) + len(f)
    # forced tokens under token routing in the forced modes (auto has none)
    assert n_forced == (len(reqs) if routing == "token" and algo == "bpo" else 0)
    # The same requests through the embedded engine under greedy: the same tokens.
    g = dataclasses.replace(params, greedy=True)
    assert [r.response_ids for r in eng.generate(reqs, g)] == \
        [r.response_ids for r in _embedded(model, env).generate(reqs, g)]
    # Forced tokens are scored at temperature 1 by vLLM: other temperatures are refused.
    if n_forced:
        with pytest.raises(ValueError, match="forced tokens only at temperature 1"):
            eng.generate(reqs, dataclasses.replace(params, temperature=0.7))


def test_top_p_behaviour_logprobs_and_the_importance_weight_is_the_kept_mass(vllm, env, rt):
    model = _model(env, 9)
    eng = build_engine(model, env.tpl, env.tok, max_seqlen=256, rollout=_vllm_rollout())
    cfg = RLConfig(group_size=2, prompts_per_step=4, max_new_tokens_think=16,
                   max_new_tokens_no_think=8, max_new_tokens_auto=16, top_p=0.7,
                   filter_zero_variance=False, routing="token")
    trainer = BPOTrainer(cfg, policy=model, engine=eng, template=env.tpl, rt=rt)
    params = sampling_params(cfg)
    banned = torch.tensor([env.tok.image_token_id])
    batch = trainer.rollout(env.items[:4], 0, torch.Generator().manual_seed(1))
    # behaviour log-probs: the truncated (top-p, vocabulary limit, banned id) distribution's
    n_sampled = 0
    for s in batch:
        r = SimpleNamespace(request=SimpleNamespace(prompt_ids=s.prompt_ids), response_ids=s.response_ids)
        z = truncated_logits(_full_logits(model, r), params, env.tok.vocab_size, banned)
        want = torch.log_softmax(z, -1)[torch.arange(len(s.response_ids)), torch.tensor(s.response_ids)]
        got = torch.tensor(s.behaviour_logprobs)
        torch.testing.assert_close(got[s.forced:], want[s.forced:], atol=1e-5, rtol=0)
        n_sampled += len(s.response_ids) - s.forced
    assert n_sampled > 20
    ga, keep = trainer.advantages(batch)
    weights = trainer.loss_weights(batch, keep)
    mbs, _ = trainer.microbatches(batch, ga.advantages, weights, keep)
    trainer.score_old_and_ref(mbs)
    kept = [batch[i] for i in keep.nonzero()[:, 0].tolist()]
    from r4b.packing import forward_rows

    ratios, masses = [], []
    for mb in mbs:
        if not mb.targets.numel():
            continue
        with torch.no_grad():
            logits = model.logits_of_hidden(forward_rows(model, mb.pk)).float()
        z = truncated_logits(logits, params, env.tok.vocab_size, banned)
        S = torch.softmax(logits / params.temperature, -1).masked_fill(~torch.isfinite(z), 0).sum(-1)
        ratio = torch.exp(mb.old_lp - mb.behaviour_lp)
        forced = torch.tensor([k < kept[mb.pk.seqs[j]].forced for j, k in
                               zip(mb.pk.row_seq.tolist(), mb.pk.row_token.tolist())])
        # forced tokens: weight 1 (behaviour = policy); sampled tokens: the kept mass S
        torch.testing.assert_close(ratio[forced], torch.ones_like(ratio[forced]), atol=1e-4, rtol=0)
        torch.testing.assert_close(ratio[~forced], S[~forced], atol=0, rtol=1e-4)
        # BPO's token weight is built on it (truncated IS with the cap, times routing)
        w = trainer.token_weights(mb)
        expect = mb.weights * ratio.clamp(max=cfg.tis_cap)
        expect = torch.where(mb.routing_rows, expect * torch.exp(mb.old_lp - math.log(0.5)), expect)
        torch.testing.assert_close(w, expect, atol=1e-7, rtol=1e-5)
        ratios.append(ratio[~forced])
        masses.append(S[~forced])
    r = torch.cat(ratios)
    assert float(r.min()) < 0.95 and float(torch.cat(masses).mean()) < 0.99  # not trivially 1


# ---------------------------------------------------------------- BPO around the update
@pytest.mark.parametrize("level", [1, 2])
def test_bpo_step_sleeps_the_engine_for_the_update_and_wakes_it_after_the_sync(vllm, env, rt, level):
    model = _model(env, 10)
    eng = build_engine(model, env.tpl, env.tok, max_seqlen=256,
                       rollout=_vllm_rollout(vllm_sleep_level=level))
    cfg = RLConfig(group_size=2, prompts_per_step=2, max_new_tokens_think=12,
                   max_new_tokens_no_think=6, max_new_tokens_auto=12, filter_zero_variance=False)
    trainer = BPOTrainer(cfg, policy=model, engine=eng, template=env.tpl, rt=rt)
    llm = eng.llm
    seen = {}
    real_update = trainer.update

    def update(mbs):
        # The update runs with the engine asleep; then the policy moves (an optimizer step).
        seen["asleep"] = set(llm.asleep)
        llm.calls.append(("update",))
        out = real_update(mbs)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        return out

    trainer.update = update
    before = _standin_state(eng)
    n = len(llm.calls)
    m = trainer.step(env.items[:2], 0, torch.Generator().manual_seed(0))
    calls = llm.calls[n:]
    n_req = 2 * 2 * cfg.group_size
    assert calls == [("generate", n_req), ("reset_prefix_cache",), ("sleep", level), ("update",),
                     ("wake_up", ("weights",)), ("apply_model",), ("wake_up", ("kv_cache",)),
                     ("reset_prefix_cache",), ("reset_encoder_cache",)], calls
    assert seen["asleep"] == {"weights", "kv_cache"} and not llm.asleep
    after = _standin_state(eng)
    assert _same_state(after, model.state_dict()) and not _same_state(after, before)
    assert m["time/sync"] > 0
    # Awake and current: the next rollout generates without another sync.
    n = len(llm.calls)
    trainer.rollout(env.items[:2], 1, torch.Generator().manual_seed(1))
    assert llm.calls[n:] == [("generate", n_req)]
    # Generating while asleep is refused by the engine.
    eng.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate(_requests(env, 1), GREEDY)
    eng.wake_up()


def test_embedded_engine_sleep_and_wake_are_no_ops(env):
    model = _model(env, 11)
    eng = _embedded(model, env)
    reqs = _requests(env, 1)
    a = eng.generate(reqs, GREEDY)
    eng.sleep()
    eng.wake_up()
    assert [r.response_ids for r in eng.generate(reqs, GREEDY)] == [r.response_ids for r in a]


# ---------------------------------------------------------------- real vLLM's behaviours
# Each test below runs against the stand-in as vLLM 0.10.2 and as 0.34.0 (BOTH); the stand-in
# copies the behaviour named in the test from that version's source.
IMG = 63
PINS = tuple((h, w) for h in (8, 16, 24) for w in (8, 16, 24)) + ((32, 32),)


def _mm_model(seed: int, *, pre_norm: bool):
    """A tiny LLaVA-OneVision / R-4B model (AnyRes on 8-px tiles, 4 features per tile,
    anyres_max_9 as vLLM's model hard-codes): ``pre_norm`` -> vLLM's RForConditionalGeneration,
    else LlavaOnevisionForConditionalGeneration."""
    from r4b.models import LMConfig, ModelConfig
    from r4b.models.vision import VisionConfig

    cfg = ModelConfig(
        lm=LMConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            patch_size=4, image_size=8, feature_layer=2),
        image_token_id=IMG, image_newline=True, image_layout="anyres", projector_pre_norm=pre_norm,
        image_grid_pinpoints=PINS, vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # weights large enough that the image changes the tokens
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _mm_engine(model, tmp_path, **kw):
    (tmp_path / "tok").mkdir(exist_ok=True)
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    return vllm_engine.VLLMEngine(model, stop_ids=[5], max_seqlen=512, banned_ids=[IMG],
                                  tokenizer_dir=tmp_path / "tok", **kw)


def _mm_requests(model, sizes_per_prompt, seed=0, forced=(7, 9)):
    """Requests with raw [3, H, W] images, placeholders expanded as r4b's template does;
    prompt and token routing."""
    from r4b.data.images import prompt_image_tokens

    g = torch.Generator().manual_seed(seed)
    reqs = []
    for k, sizes in enumerate(sizes_per_prompt):
        imgs = [torch.randint(0, 256, (3, h, w), generator=g).float() / 255 for h, w in sizes]
        counts = prompt_image_tokens(list(sizes), model.cfg)
        ids = [1, 2]
        for n in counts:
            ids += [IMG] * n + [3]
        ids += torch.randint(10, 60, (3,), generator=g).tolist()
        reqs.append(RolloutRequest(prompt_ids=ids, mode="auto", images=imgs, uid=(k, "prompt")))
        reqs.append(RolloutRequest(prompt_ids=ids, mode="think", forced_ids=list(forced),
                                   images=imgs, uid=(k, "token")))
    return reqs


MM_GREEDY = SamplingParams(greedy=True, max_new_tokens_think=6, max_new_tokens_no_think=6,
                           max_new_tokens_auto=6)


def _assert_same_rollouts(got, want):
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    assert [r.finished for r in got] == [r.finished for r in want]
    for g, w in zip(got, want):
        # vLLM's processed log-probs: the distribution after the mask (banned ids excluded)
        torch.testing.assert_close(torch.tensor(g.behaviour_logprobs),
                                   torch.tensor(w.behaviour_logprobs), atol=2e-5, rtol=0)


@BOTH
@pytest.mark.parametrize("pre_norm", [False, True], ids=["onevision", "r4b"])
def test_image_rollouts_match_the_embedded_engine(vllm, tmp_path, pre_norm):
    """vLLM expands each image's first <image> itself (token prompts too): the engine sends
    one per image, as PIL images (0.10.2 reads arrays channels-first), and reads the forced
    tokens' prompt log-probs from the end of vLLM's expanded prompt."""
    model = _mm_model(20, pre_norm=pre_norm)
    eng = _mm_engine(model, tmp_path)
    assert eng.arch == ("RForConditionalGeneration" if pre_norm else
                        "LlavaOnevisionForConditionalGeneration")
    sizes = [[(19, 13)], [(5, 23)], [(24, 24)]]
    reqs = _mm_requests(model, sizes, seed=1)
    got = eng.generate(reqs, MM_GREEDY)
    want = EmbeddedEngine(model, stop_ids=[5], max_seqlen=512, banned_ids=[IMG]).generate(reqs, MM_GREEDY)
    _assert_same_rollouts(got, want)
    from PIL import Image

    for r, p in zip(reqs, eng.llm.prompts_seen[-1]):
        assert p["prompt_token_ids"].count(IMG) == 1  # one <image> per image
        assert all(isinstance(im, Image.Image) for im in p["multi_modal_data"]["image"])
    # the image matters: another image gives other log-probs
    other = eng.generate([dataclasses.replace(r, images=[1 - r.images[0]]) for r in reqs], MM_GREEDY)
    assert max(abs(a - b) for x, y in zip(other, got)
               for a, b in zip(x.behaviour_logprobs, y.behaviour_logprobs)) > 1e-3


@BOTH
def test_a_vision_tower_changed_by_a_sync_reaches_image_rollouts(vllm, tmp_path):
    """vLLM caches vision features by image hash across requests, and reset_prefix_cache does
    not clear them: after a sync while awake, the same images must be encoded again."""
    model = _mm_model(21, pre_norm=True)
    eng = _mm_engine(model, tmp_path)
    reqs = _mm_requests(model, [[(19, 13)], [(16, 16)]], seed=2)
    embedded = EmbeddedEngine(model, stop_ids=[5], max_seqlen=512, banned_ids=[IMG])
    _assert_same_rollouts(eng.generate(reqs, MM_GREEDY), embedded.generate(reqs, MM_GREEDY))
    runs = eng.llm.encoder_runs
    eng.generate(reqs, MM_GREEDY)
    assert eng.llm.encoder_runs == runs  # the cache serves the same images again
    before = [r.logprobs for r in embedded.generate(reqs, MM_GREEDY)]
    with torch.no_grad():  # a training step that moves the tower only
        for p in model.vision_tower.parameters():
            p.add_(0.5 * torch.randn_like(p))
    eng.sync_weights(model)  # awake: no sleep in between (annealing, evaluation, rebind)
    want = embedded.generate(reqs, MM_GREEDY)
    assert [r.logprobs for r in want] != before
    _assert_same_rollouts(eng.generate(reqs, MM_GREEDY), want)
    assert eng.llm.encoder_runs > runs


@BOTH
def test_image_counts_vllm_would_give_differently_are_refused(vllm, tmp_path):
    """vLLM counts every image of a prompt as a lone AnyRes image, and R-4B's vLLM class
    counts without the anyres_max_9 reduction: such requests are refused, naming the image."""
    model = _mm_model(22, pre_norm=True)
    eng = _mm_engine(model, tmp_path)
    two = _mm_requests(model, [[(19, 13), (8, 8)]], seed=3)[:1]
    with pytest.raises(ValueError, match=r"requests\[0\]\.images\[0\].*multi-image form"):
        eng.generate(two, MM_GREEDY)
    big = _mm_requests(model, [[(32, 32)]], seed=3)[:1]  # 4x4 grid: reduced by anyres_max_9
    with pytest.raises(ValueError, match=r"requests\[0\]\.images\[0\] \(32x32.*LLaVA-NeXT"):
        eng.generate(big, MM_GREEDY)
    # LLaVA-OneVision's class counts the reduction: the same image goes through.
    ov = _mm_model(22, pre_norm=False)
    got = _mm_engine(ov, tmp_path).generate(big, MM_GREEDY)
    want = EmbeddedEngine(ov, stop_ids=[5], max_seqlen=512, banned_ids=[IMG]).generate(big, MM_GREEDY)
    _assert_same_rollouts(got, want)


@BOTH
def test_the_vocabulary_mask_fits_vllms_per_request_cap(vllm, env):
    """vLLM 0.34 takes at most 1024 allowed_token_ids (and logit_bias entries) per request:
    a padded LM head's excluded ids go in as logit_bias instead of the allowed vocabulary."""
    cfg = dataclasses.replace(env.cfg, lm=dataclasses.replace(env.cfg.lm, vocab_size=2560))
    torch.manual_seed(23)
    model = build_model(cfg).eval()
    kw = dict(stop_ids=[env.tok.im_end_id], max_seqlen=256, vocab_limit=2400, banned_ids=[3])
    eng = vllm_engine.VLLMEngine(model, **kw)
    reqs = _requests(env, 2)
    sample = dataclasses.replace(GREEDY, greedy=False)
    got = eng.generate(reqs, sample, torch.Generator().manual_seed(5))
    sp = eng.llm.params_seen[-1][0]
    assert sp.allowed_token_ids is None and sorted(sp.logit_bias) == [3] + list(range(2400, 2560))
    assert all(t < 2400 and t != 3 for r in got for t in r.response_ids[len(r.request.forced_ids):])
    want = EmbeddedEngine(model, **kw).generate(reqs, GREEDY)
    _assert_same_rollouts(eng.generate(reqs, GREEDY), want)
    # Many excluded ids, few allowed: allowed_token_ids.
    eng.vocab_limit = 300
    eng.generate(reqs[:1], GREEDY)
    sp = eng.llm.params_seen[-1][0]
    assert sp.logit_bias is None and sp.allowed_token_ids == [t for t in range(300) if t != 3]
    # Neither form fits: a clear error naming the fields.
    eng.vocab_limit = 1400
    with pytest.raises(ValueError, match=r"vocab_limit 1400 and banned_ids exclude 1161 .* allow 1399"):
        eng.generate(reqs, GREEDY)


@BOTH
def test_a_stop_token_drawn_as_the_last_allowed_token_finishes_the_row(vllm, env):
    """vLLM 0.10.2 checks the length cap before the stop ids: such a row reports
    finish_reason 'length', yet it ended with its stop token."""
    model = _model(env, 24)
    reqs = [RolloutRequest(prompt_ids=env.tpl.prompt_ids(it.question, 0, "no_think"),
                           mode="no_think", uid=k) for k, it in enumerate(env.items[:3])]
    free = _embedded(model, env).generate(reqs, GREEDY)
    stop = free[0].response_ids[2]  # the third token of row 0 becomes a stop id
    n = free[0].response_ids.index(stop) + 1
    params = dataclasses.replace(GREEDY, max_new_tokens_no_think=n)
    kw = dict(stop_ids=[env.tok.im_end_id, stop], max_seqlen=256, vocab_limit=env.tok.vocab_size,
              banned_ids=[env.tok.image_token_id])
    want = EmbeddedEngine(model, **kw).generate(reqs, params)
    assert want[0].finished and len(want[0].response_ids) == n
    got = vllm_engine.VLLMEngine(model, **kw).generate(reqs, params)
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    assert [r.finished for r in got] == [r.finished for r in want]


@BOTH
def test_a_single_process_without_torchrun_gets_the_launchers_variables(vllm, env, monkeypatch):
    """vLLM's external launcher reads RANK and LOCAL_RANK from the environment (KeyError
    without them): ``python -m r4b....`` without torchrun sets them for one process."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    eng = vllm_engine.VLLMEngine(_model(env, 25), stop_ids=[env.tok.im_end_id], max_seqlen=256)
    import os

    assert (eng.llm.rank, eng.llm.local_rank) == (0, 0)
    assert os.environ["RANK"] == "0" and os.environ["LOCAL_RANK"] == "0"


@BOTH
def test_forced_token_logprobs_are_read_from_the_end_of_vllms_prompt_logprobs(vllm, tmp_path):
    """vLLM's prompt log-probs cover its own, image-expanded prompt (one entry per position,
    the first None), not the prompt the engine sent (one <image> per image): the forced tokens'
    entries are the last ones.  The prompt starts with the forced tokens themselves, so reading
    from the start finds entries for the same token ids with other values (no KeyError)."""
    from r4b.data.images import process_image, prompt_image_tokens
    from r4b.models import ImageBatch

    model = _mm_model(26, pre_norm=True)
    eng = _mm_engine(model, tmp_path)
    forced = [7, 9]
    g = torch.Generator().manual_seed(6)
    reqs = []
    for k, (h, w) in enumerate([(19, 13), (24, 24)]):
        image = torch.randint(0, 256, (3, h, w), generator=g).float() / 255
        (n,) = prompt_image_tokens([(h, w)], model.cfg)
        ids = [1] + forced + [IMG] * n + [3] + torch.randint(10, 60, (3,), generator=g).tolist()
        reqs.append(RolloutRequest(prompt_ids=ids, mode="think", forced_ids=forced,
                                   images=[image], uid=k))
    got = eng.generate(reqs, MM_GREEDY)
    want = EmbeddedEngine(model, stop_ids=[5], max_seqlen=512, banned_ids=[IMG]).generate(
        reqs, MM_GREEDY)
    for r, g_, w_ in zip(reqs, got, want):
        assert g_.response_ids[:2] == forced == w_.response_ids[:2]
        # the embedded engine scores the forced tokens on r4b's expanded prompt (temperature 1)
        torch.testing.assert_close(torch.tensor(g_.logprobs[:2]), torch.tensor(w_.logprobs[:2]),
                                   atol=2e-5, rtol=0)
        assert g_.behaviour_logprobs[:2] == g_.logprobs[:2]
        # and directly: log_softmax of one forward over prompt + forced, at the forced positions
        ids = torch.tensor([list(r.prompt_ids) + forced])
        with torch.no_grad():
            logits = model(input_ids=ids, images=ImageBatch.collate(
                [process_image(r.images[0], model.cfg)]))[0].float()
        n = len(r.prompt_ids)
        ref = torch.log_softmax(logits[n - 1:n + 1], -1)[torch.arange(2), torch.tensor(forced)]
        torch.testing.assert_close(torch.tensor(g_.logprobs[:2]), ref, atol=2e-5, rtol=0)
        # the test can tell: the same ids at the start of the prompt score differently
        start = torch.log_softmax(logits[0:2], -1)[torch.arange(2), torch.tensor(forced)]
        assert float((start - ref).abs().max()) > 1e-2, (start, ref)
    # vLLM got one <image> per image and returned its expanded prompt (longer than the one sent)
    for r, p in zip(reqs, eng.llm.prompts_seen[-1]):
        assert p["prompt_token_ids"].count(IMG) == 1
        assert len(p["prompt_token_ids"]) < len(r.prompt_ids) + len(forced)

"""Embedded rollout engine on the tiny model: determinism, KV-cache log-probs against a full
forward, forced tokens, budgets and stops, mode classification, input errors; plus the vLLM
engine's import behaviour and its vLLM-free glue."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from r4b.data import TaskConfig, make_task
from r4b.components import ModelChoice, default_task, make_template, make_tokenizer, model_config
from r4b.models import build_model
from r4b.rollout import EmbeddedEngine, Rollout, RolloutRequest, SamplingParams
from r4b.rollout import vllm_engine

HERE = Path(__file__).resolve()


class Biased(torch.nn.Module):
    """The model with a fixed bias added to its logits (to make chosen tokens likely or
    unlikely); same interface as the model."""

    def __init__(self, inner, bias: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("bias", bias)

    @property
    def cfg(self):
        return self.inner.cfg

    @property
    def vocab_size(self):
        return self.inner.vocab_size

    def new_kv_cache(self, *args, **kwargs):
        return self.inner.new_kv_cache(*args, **kwargs)

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        return out if kwargs.get("return_hidden") else out + self.bias

    def logits_of_hidden(self, hidden, **kwargs):
        return self.inner.logits_of_hidden(hidden, **kwargs) + self.bias


class FirstTokenBiased(Biased):
    """Bias only the logits that pick the first response token (the prefill's last position,
    which the engine takes through ``logits_of_hidden``)."""

    def forward(self, **kwargs):
        return self.inner(**kwargs)


@pytest.fixture(scope="module")
def text():
    tok = make_tokenizer(ModelChoice())
    task = TaskConfig(vision=False)
    cfg = model_config(ModelChoice(), tok, task)
    # An LM head padded past the tokenizer's ids (as for TP), 128 rows: divisible by TP=2.
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=128))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tpl = make_template(tok, cfg)
    items = make_task(0, 8, config=task)
    return SimpleNamespace(tok=tok, cfg=cfg, model=model, tpl=tpl, items=items)


def _engine(model, env, **kw):
    kw.setdefault("vocab_limit", env.tok.vocab_size)
    return EmbeddedEngine(model, stop_ids=[env.tok.im_end_id, env.tok.eos_id],
                          mode_classifier=env.tpl.classify_mode, **kw)


def _mixed_requests(env, n_items=4):
    """Prompt-routing and token-routing requests of all modes, ragged prompt lengths."""
    reqs = []
    for k, it in enumerate(env.items[:n_items]):
        auto = env.tpl.prompt_ids(it.question, 0, "auto")
        for m in ("think", "no_think", "auto"):
            reqs.append(RolloutRequest(prompt_ids=env.tpl.prompt_ids(it.question, 0, m), mode=m,
                                       group_id=k, uid=(k, m, "prompt")))
            reqs.append(RolloutRequest(prompt_ids=auto, mode=m, forced_ids=env.tpl.forced_ids(m),
                                       group_id=k, uid=(k, m, "token")))
    # Truncated prompts make the batch more ragged still.
    reqs.append(RolloutRequest(prompt_ids=reqs[0].prompt_ids[:3], mode="auto"))
    reqs.append(RolloutRequest(prompt_ids=reqs[1].prompt_ids[:1], mode="think",
                               forced_ids=env.tpl.forced_ids("think")))
    return reqs


PARAMS = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, max_new_tokens_think=10,
                        max_new_tokens_no_think=5, max_new_tokens_auto=8)


def _full_forward_logprobs(model, r: Rollout, T: float, images=None) -> torch.Tensor:
    """log_softmax(logits / T) at each response position, from one non-cached forward."""
    ids = torch.tensor([list(r.request.prompt_ids) + r.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, images=images)[0].float()
    n = len(r.request.prompt_ids)
    lp = torch.log_softmax(logits / T, -1)[n - 1:-1]
    return lp.gather(-1, torch.tensor(r.response_ids)[:, None])[:, 0]


def test_determinism(text):
    eng = _engine(text.model, text)
    reqs = _mixed_requests(text, 2)
    a = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(5))
    b = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(5))
    c = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(6))
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.response_ids for r in a] != [r.response_ids for r in c]
    assert [r.request for r in a] == reqs  # request order kept
    assert eng.last_stats["response_tokens"] == sum(len(r.response_ids) for r in c)
    assert eng.last_stats["rows"] == len(reqs) and eng.last_stats["tokens_per_s"] > 0


def test_cached_logprobs_match_full_forward_ragged(text):
    eng = _engine(text.model, text)
    reqs = _mixed_requests(text, 4)
    assert len({len(r.prompt_ids) for r in reqs}) >= 4  # ragged
    out = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(1))
    worst = 0.0
    for r in out:
        ref = _full_forward_logprobs(text.model, r, PARAMS.temperature)
        got = torch.tensor(r.logprobs, dtype=torch.float32)
        worst = max(worst, float((got - ref).abs().max()))
    assert worst <= 1e-5, worst
    # Tokens beyond the tokenizer's vocabulary (LM-head padding) are never drawn.
    assert max(t for r in out for t in r.response_ids) < text.tok.vocab_size


def test_forced_tokens_scored_never_sampled_and_budgets(text):
    tok, tpl = text.tok, text.tpl
    V = text.model.vocab_size
    forced_think, forced_no = tpl.forced_ids("think"), tpl.forced_ids("no_think")
    unlikely = sorted(set(forced_think + forced_no))
    bias = torch.zeros(V)
    bias[unlikely] = -40.0          # the forced tokens are (practically) never drawn
    bias[tok.im_end_id] = 2.5       # end of turn is likely: some rows stop, some hit the budget
    model = Biased(text.model, bias)
    eng = _engine(model, text)
    reqs = []
    for it in text.items:
        auto = tpl.prompt_ids(it.question, 0, "auto")
        for m in ("think", "no_think", "think", "no_think", "auto"):
            reqs.append(RolloutRequest(prompt_ids=auto, mode=m, forced_ids=tpl.forced_ids(m)))
    # A forced token that is a stop token does not end the response.
    reqs.append(RolloutRequest(prompt_ids=reqs[0].prompt_ids, mode="auto",
                               forced_ids=[tok.im_end_id, tok.im_end_id]))
    out = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(3))
    stops = {tok.im_end_id, tok.eos_id}
    n_finished = 0
    for r in out:
        f = r.request.forced_ids
        budget = PARAMS.max_new_tokens(r.request.mode) + len(f)
        assert r.response_ids[:len(f)] == f
        assert all(lp < -30 for lp in r.logprobs[:len(f)] if f != [tok.im_end_id] * 2)
        assert all(lp != 0.0 for lp in r.logprobs)
        sampled = r.response_ids[len(f):]
        assert not set(sampled) & set(unlikely)
        assert len(r.response_ids) <= budget
        if r.finished:
            n_finished += 1
            assert sampled and sampled[-1] in stops
            assert not set(sampled[:-1]) & stops
        else:
            assert len(r.response_ids) == budget and not set(sampled) & stops
        torch.testing.assert_close(torch.tensor(r.logprobs),
                                   _full_forward_logprobs(model, r, PARAMS.temperature),
                                   atol=1e-5, rtol=0)
        # Mode as the template reads it; forced rows are in their forced mode.
        assert r.mode_chosen == tpl.classify_mode(r.request.prompt_ids, r.response_ids)
        if r.request.mode != "auto":
            assert r.mode_chosen == r.request.mode
    assert 0 < n_finished < len(out), n_finished
    assert len(out[-1].response_ids) > 2  # went on past the forced stop tokens


def test_auto_mode_choice_reported(text):
    tpl = text.tpl
    bias = torch.zeros(text.model.vocab_size)
    r_think, r_no = tpl.routing_ids["think"], tpl.routing_ids["no_think"]
    bias[[r_think, r_no]] = 8.0     # the first auto token is one of the two routing tokens
    eng = _engine(FirstTokenBiased(text.model, bias), text)
    reqs = [RolloutRequest(prompt_ids=tpl.prompt_ids(it.question, 0, "auto"), mode="auto")
            for it in text.items for _ in range(2)]
    out = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(0))
    chosen = [r.mode_chosen for r in out]
    for r in out:
        assert r.mode_chosen == tpl.classify_mode(r.request.prompt_ids, r.response_ids)
        first = r.response_ids[0]
        if first == r_no:
            assert r.mode_chosen == "no_think"
    assert "think" in chosen and "no_think" in chosen
    eng.mode_classifier = None
    assert all(r.mode_chosen is None for r in eng.generate(reqs[:2], PARAMS))


def test_padding_ids_never_drawn_by_default_with_a_template(text):
    bias = torch.zeros(text.model.vocab_size)
    bias[text.tok.vocab_size:] = 6.0  # padding rows of the LM head made very likely
    model = Biased(text.model, bias)
    eng = EmbeddedEngine(model, stop_ids=[text.tok.im_end_id],
                         mode_classifier=text.tpl.classify_mode)
    assert eng.vocab_limit == text.tok.vocab_size
    reqs = _mixed_requests(text, 1)
    out = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(0))
    assert max(t for r in out for t in r.response_ids) < text.tok.vocab_size
    r = out[0]  # log-probs stay full-vocabulary: the padding mass is in the normaliser
    torch.testing.assert_close(torch.tensor(r.logprobs),
                               _full_forward_logprobs(model, r, PARAMS.temperature),
                               atol=1e-5, rtol=0)
    # Without a limit the padding ids are drawn.
    free = EmbeddedEngine(model, stop_ids=[text.tok.im_end_id])
    out = free.generate(reqs, PARAMS, torch.Generator().manual_seed(0))
    assert max(t for r in out for t in r.response_ids) >= text.tok.vocab_size


def test_bad_requests_name_the_index(text):
    eng = _engine(text.model, text, max_seqlen=64)
    good = RolloutRequest(prompt_ids=[1, 2, 3], mode="auto")
    cases = [
        (RolloutRequest(prompt_ids=[1, 2], mode="long"), r"requests\[1\]\.mode"),
        (RolloutRequest(prompt_ids=[], mode="think"), r"requests\[1\]\.prompt_ids is empty"),
        (RolloutRequest(prompt_ids=[1] * 60, mode="think"), r"requests\[1\].*max_seqlen 64"),
        (RolloutRequest(prompt_ids=[1, 999], mode="think"), r"requests\[1\]\.prompt_ids must lie"),
        (RolloutRequest(prompt_ids=[1], mode="think", forced_ids=[-1]),
         r"requests\[1\]\.forced_ids must lie"),
        (RolloutRequest(prompt_ids=[1], mode="think", images=np.zeros((1, 1, 18, 18), np.float32)),
         r"requests\[1\] has images but the model is text-only"),
    ]
    for bad, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            eng.generate([good, bad], PARAMS)
    with pytest.raises(ValueError, match="max_seqlen"):
        EmbeddedEngine(text.model, stop_ids=[1], max_seqlen=10**6)
    with pytest.raises(ValueError, match="stop_ids"):
        EmbeddedEngine(text.model, stop_ids=[])
    with pytest.raises(ValueError, match="vocab_limit"):
        EmbeddedEngine(text.model, stop_ids=[1], vocab_limit=10**4)
    assert eng.generate([], PARAMS) == []


def test_sync_weights_copies_a_policy(text):
    torch.manual_seed(1)
    other = build_model(text.cfg).eval()
    torch.manual_seed(2)
    target = build_model(text.cfg).eval()
    eng = _engine(target, text)
    reqs = _mixed_requests(text, 1)[:3]
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    ref = _engine(other, text).generate(reqs, PARAMS, g())
    assert eng.generate(reqs, PARAMS, g())[0].logprobs != ref[0].logprobs
    assert eng.sync_weights(other) >= 0 and eng.sync_weights(None) >= 0
    got = eng.generate(reqs, PARAMS, g())
    assert [r.response_ids for r in got] == [r.response_ids for r in ref]
    assert [r.logprobs for r in got] == [r.logprobs for r in ref]
    with pytest.raises(ValueError, match="policy parameters do not match"):
        eng.sync_weights(torch.nn.Linear(2, 2))


def test_multimodal_cached_logprobs_match_full_forward():
    tok = make_tokenizer(ModelChoice())
    task = default_task()
    cfg = model_config(ModelChoice(), tok, task)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tpl = make_template(tok, cfg)
    items = make_task(1, 3, config=task)
    env = SimpleNamespace(tok=tok, tpl=tpl)
    bias = torch.zeros(model.vocab_size)
    bias[tok.image_token_id] = 5.0  # the image placeholder made likely: it is never drawn
    model = Biased(model, bias)
    eng = _engine(model, env)
    assert eng.banned_ids == [tok.image_token_id]
    reqs = []
    for it in items:
        img = np.stack(it.images)
        reqs.append(RolloutRequest(prompt_ids=tpl.prompt_ids(it.question, 1, "auto"), mode="auto",
                                   images=img))
        reqs.append(RolloutRequest(prompt_ids=tpl.prompt_ids(it.question, 1, "auto"), mode="think",
                                   forced_ids=tpl.forced_ids("think"), images=torch.as_tensor(img)))
    reqs.append(RolloutRequest(prompt_ids=tpl.prompt_ids("what is the answer?", 0, "no_think"),
                               mode="no_think"))  # a text-only row in the same batch
    assert len({len(r.prompt_ids) for r in reqs}) >= 2
    out = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(4))
    for r in out:
        img = None if r.request.images is None else torch.as_tensor(r.request.images)
        ref = _full_forward_logprobs(model, r, PARAMS.temperature, images=img)
        torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=1e-5, rtol=0)
        assert tok.image_token_id not in r.response_ids
    unbanned = EmbeddedEngine(model, stop_ids=[tok.im_end_id], banned_ids=[])
    assert any(tok.image_token_id in r.response_ids
               for r in unbanned.generate(reqs[-1:], PARAMS, torch.Generator().manual_seed(4)))
    # Placeholder / tile mismatch names the request.
    bad = RolloutRequest(prompt_ids=reqs[0].prompt_ids, mode="auto",
                         images=np.concatenate([reqs[0].images] * 2))
    with pytest.raises(ValueError, match=r"requests\[1\]: prompt_ids hold"):
        eng.generate([reqs[0], bad], PARAMS)


@pytest.mark.gpu
def test_cuda_model_with_cpu_generator(text):
    model = build_model(text.cfg, device="cuda").eval()
    model.load_state_dict(text.model.state_dict())
    eng = _engine(model, text)
    reqs = _mixed_requests(text, 2)
    a = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(5))
    b = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(5))
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    for r in a:
        ref = _full_forward_logprobs(text.model, r, PARAMS.temperature)
        torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- tensor parallelism
def _tp_generate(root: Path, tp_size: int) -> list[dict]:
    """Load ``root/ckpt`` at ``tp_size``, run the engine on ``root/requests.json``."""
    from r4b.models import from_hf

    spec = json.loads((root / "requests.json").read_text())
    model = from_hf(root / "ckpt", tp_size=tp_size).eval()
    eng = EmbeddedEngine(model, stop_ids=spec["stop_ids"], vocab_limit=spec["vocab_limit"])
    reqs = [RolloutRequest(prompt_ids=r["prompt"], mode=r["mode"], forced_ids=r["forced"])
            for r in spec["requests"]]
    out = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(spec["seed"]))
    return [{"ids": r.response_ids, "lps": r.logprobs, "finished": r.finished} for r in out]


def tp_worker(root: Path, rank: int) -> None:
    """One rank of the TP=2 engine run (this file run as a script)."""
    from r4b.models import init_model_parallel

    init_model_parallel(2, 1, backend="gloo")
    out = _tp_generate(root, 2)
    (root / f"tp2_rank{rank}.json").write_text(json.dumps(out))


def test_tp2_engine_matches_tp1(text, tmp_path):
    from r4b.models import to_hf
    from r4b.models.parallel import free_port

    to_hf(text.model, tmp_path / "ckpt")
    reqs = _mixed_requests(text, 2)
    spec = {"stop_ids": [text.tok.im_end_id, text.tok.eos_id], "vocab_limit": text.tok.vocab_size,
            "seed": 21, "requests": [{"prompt": list(r.prompt_ids), "mode": r.mode,
                                      "forced": list(r.forced_ids)} for r in reqs]}
    (tmp_path / "requests.json").write_text(json.dumps(spec))
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(HERE), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    ref = _tp_generate(tmp_path, 1)  # TP=1 in this process, while the workers run
    for p in procs:
        try:
            log = p.communicate(timeout=180)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, f"worker failed (rc={p.returncode}):\n{log[-4000:]}"
    ranks = [json.loads((tmp_path / f"tp2_rank{k}.json").read_text()) for k in range(2)]
    assert ranks[0] == ranks[1]  # every TP rank draws the same tokens
    assert [r["ids"] for r in ranks[0]] == [r["ids"] for r in ref]
    assert [r["finished"] for r in ranks[0]] == [r["finished"] for r in ref]
    got = torch.tensor([x for r in ranks[0] for x in r["lps"]])
    want = torch.tensor([x for r in ref for x in r["lps"]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- vLLM engine (no vLLM here)
@pytest.mark.skipif(vllm_engine.HAVE_VLLM, reason="vLLM is installed")
def test_vllm_engine_without_vllm_raises_naming_the_extra():
    assert vllm_engine.HAVE_VLLM is False
    with pytest.raises(ImportError, match=r"pip install 'r4b\[gpu\]'"):
        vllm_engine.VLLMEngine("/nonexistent", stop_ids=[1])


def _fake_vllm_engine(stop_ids, classifier=None):
    eng = object.__new__(vllm_engine.VLLMEngine)
    eng.stop_ids, eng.mode_classifier, eng.vocab_limit = set(stop_ids), classifier, None
    eng.banned_ids, eng.vocab_size = [], 8
    eng._vllm = SimpleNamespace(SamplingParams=lambda **kw: kw)
    return eng


def test_vllm_glue_maps_requests_and_outputs():
    eng = _fake_vllm_engine([7], classifier=lambda p, r: f"{len(p)}:{len(r)}")
    req = RolloutRequest(prompt_ids=[1, 2, 3], mode="think", forced_ids=[4, 5])
    sp = eng._sampling_params(req, PARAMS, seed=11)
    assert sp["max_tokens"] == PARAMS.max_new_tokens_think and sp["prompt_logprobs"] == 0
    assert sp["top_k"] == 40 and sp["seed"] == 11 and sp["stop_token_ids"] == [7]
    assert sp["logprobs"] == 0 and sp["ignore_eos"] is True
    eng2 = _fake_vllm_engine([7])
    eng2.vocab_limit, eng2.banned_ids = 6, [2]
    # excluded ids go in as logit_bias (vLLM 0.34 caps allowed_token_ids at 1024 entries)
    assert eng2._sampling_params(req, PARAMS, None)["logit_bias"] == {2: -100.0, 6: -100.0,
                                                                      7: -100.0}
    eng2.vocab_limit = None
    assert eng2._sampling_params(req, PARAMS, None)["logit_bias"] == {2: -100.0}
    assert _fake_vllm_engine([7])._sampling_params(
        RolloutRequest(prompt_ids=[1], mode="auto"), SamplingParams(greedy=True), None
    )["temperature"] == 0.0
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    # prompt_logprobs[k] scores prompt token k (prompt = 3 prompt ids + 2 forced ids).
    plp = [None, {2: lp(-0.1)}, {3: lp(-0.2)}, {4: lp(-0.3)}, {5: lp(-0.4)}]
    comp = SimpleNamespace(token_ids=[9, 7], logprobs=[{9: lp(-1.0)}, {7: lp(-2.0)}],
                           finish_reason="stop")
    r = eng._rollout(req, SimpleNamespace(outputs=[comp], prompt_logprobs=plp))
    assert r.response_ids == [4, 5, 9, 7] and r.logprobs == [-0.3, -0.4, -1.0, -2.0]
    assert r.finished and r.mode_chosen == "3:4"
    comp2 = SimpleNamespace(token_ids=[9, 9], logprobs=[{9: lp(-1.0)}, {9: lp(-1.5)}],
                            finish_reason="length")
    r2 = eng._rollout(RolloutRequest(prompt_ids=[1], mode="auto"),
                      SimpleNamespace(outputs=[comp2], prompt_logprobs=None))
    assert r2.response_ids == [9, 9] and not r2.finished
    imgs = vllm_engine.tiles_to_images(torch.tensor([[[[0.0, 1.0], [0.5, 0.2]]]]))
    assert len(imgs) == 1 and imgs[0].shape == (2, 2, 3) and imgs[0].dtype == np.uint8
    assert imgs[0][0, 1].tolist() == [255, 255, 255] and imgs[0][1, 0, 0] == 128


if __name__ == "__main__":
    tp_worker(Path(sys.argv[1]), int(os.environ["RANK"]))


def test_kv_budget_waves_give_the_same_samples(text):
    """A batch whose unbounded cache is 4x the budget runs in waves within it, with exactly
    the samples (and log-probs) of the unbounded run for the same seed."""
    reqs = _mixed_requests(text, 4)
    free = _engine(text.model, text)
    want = free.generate(reqs, PARAMS, torch.Generator().manual_seed(8))
    unbounded = free.last_stats["kv_tokens_peak"]
    budget = unbounded // 4
    eng = _engine(text.model, text, kv_budget_tokens=budget)
    got = eng.generate(reqs, PARAMS, torch.Generator().manual_seed(8))
    assert eng.last_stats["waves"] >= 4 and eng.last_stats["kv_tokens_peak"] <= budget
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    for a, b in zip(got, want):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert a.behaviour_logprobs == pytest.approx(b.behaviour_logprobs, abs=1e-5)
    with pytest.raises(ValueError, match="kv_budget_tokens"):
        _engine(text.model, text, kv_budget_tokens=8).generate(reqs, PARAMS,
                                                               torch.Generator().manual_seed(8))

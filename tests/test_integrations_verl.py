"""r4b_kernels.integrations.verl against verl's own implementations (verl 0.9.1).

Run where verl is importable (an opt-in install: ``pip install --no-deps verl==0.9.1 omegaconf
tensordict codetiming orjson``; its package ``__init__`` imports Ray, which a CPU test machine
need not have, so when Ray is missing this file puts a stand-in ``ray`` module in
``sys.modules`` that raises on every use: the modules tested here never call it).  Skipped,
with the reason, where verl is not installed.

* policy loss ``"r4b"`` == verl's registered ``"vanilla"`` (loss, gradient w.r.t. log_prob,
  metrics) for every ``loss_agg_mode``, local and global batch info, with rollout IS weights;
* ``"r4b_grpo"`` == verl's ``"grpo"`` (std-scaled and not); ``"r4b_bpo"`` == ``"grpo"`` on
  merged groups that are not degenerate and exactly 0 on singletons and all-equal groups;
* ``linear_cross_entropy`` == verl's torch backend (``FusedLinearForPPO``): log-probs, entropy,
  gradients w.r.t. hidden and weight under mixed incoming gradients; and vocab-parallel over a
  2-process gloo group against the same backend on the full head.
"""

import importlib.util
import os
import subprocess
import sys
import types
import zlib

import numpy as np
import pytest
import torch


def _seed(*parts) -> int:
    """A seed fixed by the test's parameters (crc32: the same in every process, unlike hash())."""
    return zlib.crc32(repr(parts).encode()) % 2**31


HAVE_VERL = importlib.util.find_spec("verl") is not None
pytestmark = pytest.mark.skipif(not HAVE_VERL, reason="verl is not installed (opt-in: see this file's docstring)")

RAY_STUB = '''
import importlib.util, sys, types
if "ray" not in sys.modules and importlib.util.find_spec("ray") is None:
    ray = types.ModuleType("ray")  # stand-in: verl/__init__ -> verl/protocol.py imports ray
    ray.ObjectRef = type("ObjectRef", (), {})
    def _unavailable(*args, **kwargs):
        raise RuntimeError("ray is not installed; this process only loads verl's loss modules")
    ray.get = ray.put = ray.remote = ray.init = _unavailable
    sys.modules["ray"] = ray
'''


def _verl():
    exec(RAY_STUB, {})
    from verl.trainer.ppo import core_algos

    return core_algos


def _config(**kw):
    from omegaconf import OmegaConf

    base = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, global_batch_info={})
    base.update(kw)
    return OmegaConf.create(base)


def _loss_inputs(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, L, generator=g) > 0.25).float()
    mask[0] = 0.0  # a fully masked sequence
    mask[1, :] = 1.0
    old = -torch.rand(B, L, generator=g) * 3
    logp = old + 0.8 * torch.randn(B, L, generator=g)  # ratios clipped on both sides and dual-clipped
    adv = torch.randn(B, L, generator=g)
    logp[1, :3] = old[1, :3] + 1.5  # r = 4.5 > clip_ratio_c with A < 0: dual-clipped
    adv[1, :3] = -1.0
    isw = torch.rand(B, L, generator=g) + 0.5
    return old, logp, adv, mask, isw


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                                  "seq-mean-token-mean"])
@pytest.mark.parametrize("batch_info", ["local", "global"])
@pytest.mark.parametrize("with_is", [False, True])
def test_policy_loss_matches_vanilla(mode, batch_info, with_is):
    ca = _verl()
    from r4b_kernels.integrations.verl import register

    register()
    B, L = 6, 11
    old, logp, adv, mask, isw = _loss_inputs(B, L, seed=_seed(mode, batch_info, with_is))
    info = {} if batch_info == "local" else dict(dp_size=2, batch_num_tokens=117, global_batch_size=13,
                                                 loss_scale_factor=32)
    cfg = _config(global_batch_info=info)
    out = []
    for name in ("vanilla", "r4b"):
        lp = logp.clone().requires_grad_()
        loss, metrics = ca.get_policy_loss_fn(name)(old_log_prob=old, log_prob=lp, advantages=adv,
                                                    response_mask=mask, loss_agg_mode=mode, config=cfg,
                                                    rollout_is_weights=isw if with_is else None)
        loss.backward()
        out.append((loss.detach(), lp.grad, metrics))
    (lv, gv, mv), (lr, gr, mr) = out
    torch.testing.assert_close(lr, lv, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gr, gv, rtol=1e-5, atol=1e-8)
    assert mr.keys() == mv.keys()
    for k in mv:
        assert mr[k] == pytest.approx(mv[k], rel=1e-5, abs=1e-7), k
    assert mv["actor/pg_clipfrac"] > 0 and mv["actor/pg_clipfrac_lower"] > 0


def test_policy_loss_errors():
    from r4b_kernels.integrations.verl import compute_policy_loss_r4b

    old, logp, adv, mask, _ = _loss_inputs(3, 4, seed=1)
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        compute_policy_loss_r4b(old, logp, adv, mask, "token-median", _config())
    with pytest.raises(ValueError, match="batch_num_tokens"):
        compute_policy_loss_r4b(old, logp, adv, mask, "token-mean", _config(global_batch_info={"dp_size": 2}))
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        compute_policy_loss_r4b(old, logp, adv, mask, "token-mean", _config(clip_ratio_c=1.0))


def _rewards(groups, seed, binary):
    g = torch.Generator().manual_seed(seed)
    n = sum(groups)
    index = np.concatenate([np.full(k, f"uid-{i}", dtype=object) for i, k in enumerate(groups)])
    perm = torch.randperm(n, generator=g).numpy()
    index = index[perm]
    scores = (torch.rand(n, generator=g) > 0.5).float() if binary else torch.randn(n, generator=g)
    L = 7
    mask = (torch.rand(n, L, generator=g) > 0.2).float()
    mask[:, 0] = 1.0
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    rewards = torch.where(last, scores[:, None], 0.0)  # outcome reward on the last response token
    return rewards, mask, index


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_grpo_advantage_matches_verl(norm, binary):
    ca = _verl()
    from r4b_kernels.integrations.verl import register

    register()
    rewards, mask, index = _rewards([8, 8, 1, 5, 2, 8], seed=int(norm) * 2 + int(binary), binary=binary)
    want, want_ret = ca.get_adv_estimator_fn("grpo")(token_level_rewards=rewards, response_mask=mask,
                                                     index=index, norm_adv_by_std_in_grpo=norm)
    got, got_ret = ca.get_adv_estimator_fn("r4b_grpo")(token_level_rewards=rewards, response_mask=mask,
                                                       index=index, norm_adv_by_std_in_grpo=norm, config=None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_ret, want_ret, rtol=1e-5, atol=1e-6)


def test_bpo_merged_group_advantage():
    """A prompt's think and no-think rollouts share a uid: one merged group of 2g."""
    ca = _verl()
    from r4b_kernels.integrations.verl import register

    register()
    rewards, mask, index = _rewards([8, 8, 1, 8], seed=5, binary=True)
    scores = rewards.sum(-1)
    uid = np.asarray(index)
    scores[uid == "uid-1"] = 1.0  # an all-right group
    rewards = torch.where(rewards != 0, 0.0, rewards)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    rewards = torch.where(last, scores[:, None], 0.0)
    got, _ = ca.get_adv_estimator_fn("r4b_bpo")(token_level_rewards=rewards, response_mask=mask, index=index)
    want, _ = ca.get_adv_estimator_fn("grpo")(token_level_rewards=rewards, response_mask=mask, index=index)
    degenerate = torch.from_numpy((uid == "uid-1") | (uid == "uid-2"))
    assert bool((got[degenerate] == 0).all())
    assert bool((want[torch.from_numpy(uid == "uid-2")] != 0).any()), "verl scores a lone rollout r / (1 + eps)"
    torch.testing.assert_close(got[~degenerate], want[~degenerate], rtol=1e-5, atol=1e-6)
    assert bool((got[~degenerate] != 0).any())


@pytest.mark.parametrize("shape", ["2d", "3d"])
@pytest.mark.parametrize("grads", ["both", "logp_only", "entropy_only", "sparse"])
def test_linear_cross_entropy_matches_torch_backend(shape, grads):
    _verl()
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    from r4b_kernels.integrations.verl import linear_cross_entropy

    g = torch.Generator().manual_seed(_seed(shape, grads))
    B, S, H, V = 3, 37, 24, 301
    x = torch.randn(B, S, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.4
    y = torch.randint(0, V, (B, S), generator=g)
    ga, gb = torch.randn(B * S, generator=g), torch.randn(B * S, generator=g)
    if grads == "logp_only":
        gb.zero_()
    elif grads == "entropy_only":
        ga.zero_()
    elif grads == "sparse":
        ga[::3] = 0.0
        gb[::2] = 0.0
        gb[5] = 1e-42  # a quotient a / |b| that overflows fp32
    if shape == "2d":
        x, y = x.reshape(B * S, H), y.reshape(-1)
    out = []
    for impl in ("verl", "r4b"):
        xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
        if impl == "verl":
            lp, ent = FusedLinearForPPO(chunk_size=16)(xx, WW, y, temperature=0.7)
        else:
            lp, ent = linear_cross_entropy(xx, WW, y, 0.7, "none")
        lp, ent = lp.reshape(-1), ent.reshape(-1)
        ((lp * ga).sum() + (ent * gb).sum()).backward()
        out.append((lp.detach(), ent.detach(), xx.grad, WW.grad))
    for got, want in zip(out[1], out[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_linear_cross_entropy_errors():
    from r4b_kernels.integrations.verl import linear_cross_entropy

    with pytest.raises(ValueError, match="reduction must be 'none'"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), 1.0, "mean")
    with pytest.raises(ValueError, match="labels must hold one id per hidden row"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long), 1.0)


def test_patch_linear_cross_entropy_replaces_every_binding():
    _verl()
    import verl.utils.kernel.linear_cross_entropy as lce

    from r4b_kernels.integrations.verl import linear_cross_entropy, patch_linear_cross_entropy

    original = lce.linear_cross_entropy
    bound = types.ModuleType("verl._bound_at_import")  # as verl.models.mcore.model_forward_fused binds it
    bound.linear_cross_entropy = original
    sys.modules[bound.__name__] = bound
    try:
        undo = patch_linear_cross_entropy()
        assert lce.linear_cross_entropy is linear_cross_entropy
        assert bound.linear_cross_entropy is linear_cross_entropy
        undo()
        assert lce.linear_cross_entropy is original and bound.linear_cross_entropy is original
    finally:
        del sys.modules[bound.__name__]


def test_external_modules_plugin_registers(tmp_path):
    """``VERL_USE_EXTERNAL_MODULES=r4b_kernels.integrations.verl_plugin`` registers on ``import verl``."""
    code = RAY_STUB + ("import verl\nfrom verl.trainer.ppo import core_algos as ca\n"
                       "from r4b_kernels.integrations import verl as adapter\n"
                       "assert ca.get_policy_loss_fn('r4b') is adapter.compute_policy_loss_r4b\n"
                       "assert ca.get_adv_estimator_fn('r4b_bpo') is adapter.compute_bpo_outcome_advantage\n")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="r4b_kernels.integrations.verl_plugin")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def _tp_worker(rank, world, port, q):
    import torch.distributed as dist

    exec(RAY_STUB, {})
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    from r4b_kernels.integrations.verl import linear_cross_entropy

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        g = torch.Generator().manual_seed(0)  # same full inputs on every rank
        T, H, V = 29, 16, 2 * 53
        x = torch.randn(T, H, generator=g)
        W = torch.randn(V, H, generator=g) * 0.5
        y = torch.randint(0, V, (T,), generator=g)
        ga, gb = torch.randn(T, generator=g), torch.randn(T, generator=g)
        gb[::4] = 0.0
        xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
        lp_r, ent_r = FusedLinearForPPO(chunk_size=8)(xr, Wr, y, temperature=1.1)
        ((lp_r * ga).sum() + (ent_r * gb).sum()).backward()
        Vl = V // world
        xs, Ws = x.clone().requires_grad_(), W[rank * Vl:(rank + 1) * Vl].clone().requires_grad_()
        lp, ent = linear_cross_entropy(xs, Ws, y, 1.1, "none", dist.group.WORLD)
        ((lp * ga).sum() + (ent * gb).sum()).backward()
        dh = xs.grad.clone()
        dist.all_reduce(dh)  # the group's sum is the full hidden gradient
        for got, want in ((lp, lp_r), (ent, ent_r), (dh, xr.grad), (Ws.grad, Wr.grad[rank * Vl:(rank + 1) * Vl])):
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-5)
        q.put((rank, "ok"))
    except Exception as e:  # reported to the parent, which fails the test with it
        q.put((rank, repr(e)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_linear_cross_entropy_vocab_parallel_gloo():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_tp_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {0: "ok", 1: "ok"}, results

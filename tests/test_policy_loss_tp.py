"""Vocab-parallel policy_loss / token_logprobs: TP=2 (two gloo processes, vocab split in
halves) equals TP=1 for loss, log-probs, entropy, statistics and gradients, for every impl.

Gradient contract checked here: the hidden gradient on every rank is the FULL gradient; each
rank's weight gradient is the matching slice of the TP=1 weight gradient.
"""

import datetime
import importlib
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The package re-exports the function ``policy_loss``, which shadows the submodule attribute
# of the same name, so the module object is fetched by name.
pl = importlib.import_module("r4b_kernels.policy_loss")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(seed, T, H, V, dtype):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 3 / H ** 0.5).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(hidden.float() @ weight.float().T, -1).gather(1, targets[:, None])[:, 0]
    old = lp + 0.3 * torch.randn(T, generator=g)
    ref = lp + 0.3 * torch.randn(T, generator=g)
    adv = torch.randn(T, generator=g)
    w = torch.rand(T, generator=g) / T
    return hidden, weight, targets, old, adv, w, ref


def _run(impl, hidden, weight, targets, old, adv, w, ref, **kw):
    h = hidden.clone().requires_grad_()
    W = weight.clone().requires_grad_()
    out = pl.policy_loss(h, W, targets, old, adv, token_weights=w, ref_logprobs=ref, kl_coef=0.1,
                         kl_estimator="k3", eps_low=0.15, eps_high=0.28, dual_clip=3.0, entropy_coef=0.02,
                         temperature=0.8, return_entropy=True, impl=impl, **kw)
    out.loss.backward()
    return out, h.grad, W.grad


def _worker(rank, port, seed, cases):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.new_group(list(range(WORLD)))
        pl.POISON_BUFFERS = True
        for T, H, V, dtype, impl, tol in cases:
            hidden, weight, targets, old, adv, w, ref = _inputs(seed + T, T, H, V, dtype)
            v_local = V // WORLD
            lo = rank * v_local
            shard = weight[lo:lo + v_local].contiguous()
            full, fdh, fdw = _run(impl, hidden, weight, targets, old, adv, w, ref, chunk_rows=16)
            tp, tdh, tdw = _run(impl, hidden, shard, targets, old, adv, w, ref, chunk_rows=16,
                                tp_group=group, vocab_start=lo)
            tag = f"rank {rank} {impl} {dtype} T={T}"
            close = lambda a, b, what: torch.testing.assert_close(  # noqa: E731
                a.float(), b.float(), atol=tol, rtol=tol, msg=lambda m: f"{tag} {what}: {m}")
            close(tp.loss.detach(), full.loss.detach(), "loss")
            for f in ("logprobs", "entropy", "ratio", "kl", "pg_loss", "clip_frac", "clip_frac_tokens",
                      "dual_clip_frac", "kl_mean", "entropy_mean"):
                close(getattr(tp, f), getattr(full, f), f)
            close(tdh, fdh, "hidden grad (full on every rank)")
            close(tdw, fdw[lo:lo + v_local], "weight grad (this shard's slice)")
            lp, ent = pl.token_logprobs(hidden, shard, targets, temperature=0.8, return_entropy=True,
                                        tp_group=group, vocab_start=lo, impl=impl, chunk_rows=16)
            lp1, ent1 = pl.token_logprobs(hidden, weight, targets, temperature=0.8, return_entropy=True,
                                          impl=impl, chunk_rows=16)
            close(lp, lp1, "token_logprobs")
            close(ent, ent1, "token_logprobs entropy")
            # Every rank must hold identical results (replicated loss and statistics).
            both = [torch.empty_like(tp.logprobs) for _ in range(WORLD)]
            dist.all_gather(both, tp.logprobs)
            assert torch.equal(both[0], both[1]), f"{tag}: ranks disagree on logprobs"
            bad = targets.clone()
            bad[0] = V  # one past the last id of the last shard
            try:
                pl.token_logprobs(hidden, shard, bad, tp_group=group, vocab_start=lo, impl=impl,
                                  check_inputs=True)
            except ValueError as e:
                assert f"[0, {V})" in str(e), str(e)
            else:
                raise AssertionError(f"{tag}: out-of-range target accepted")
            # Unchecked (the default), that row's log-prob is NaN on every rank, the rest exact.
            lp_bad = pl.token_logprobs(hidden, shard, bad, temperature=0.8, tp_group=group,
                                       vocab_start=lo, impl=impl, chunk_rows=16)
            assert torch.isnan(lp_bad[0]) and torch.equal(lp_bad[1:], lp[1:]), f"{tag}: {lp_bad[:3]}"
            out_bad = pl.policy_loss(hidden, shard, bad, old, adv, tp_group=group, vocab_start=lo,
                                     impl=impl, chunk_rows=16)
            assert torch.isnan(out_bad.logprobs[0]) and torch.isnan(out_bad.loss), tag
    finally:
        dist.destroy_process_group()


def test_tp2_equals_tp1():
    cases = [(45, 32, 600, torch.float32, "torch", 2e-5),
             (45, 32, 600, torch.float32, "chunked", 2e-5),
             (37, 48, 514, torch.bfloat16, "chunked", 3e-2)]
    if pl.HAS_TRITON:
        cases += [(45, 32, 600, torch.float32, "triton", 2e-5),
                  # bf16: the TP path all-reduces bf16 partial dH, TP=1 rounds the full one once
                  (37, 48, 514, torch.bfloat16, "triton", 3e-2)]
    seed = int(torch.randint(0, 2**30, ()).item())  # fresh inputs every run, same on both ranks
    mp.spawn(_worker, args=(_free_port(), seed, cases), nprocs=WORLD, join=True)


def test_tp_group_requires_initialised_distributed():
    # In a fresh interpreter: other tests of this session may have initialised a process group.
    import subprocess
    import sys
    code = ("import torch, r4b_kernels as K\n"
            "h, W = torch.randn(3, 8), torch.randn(10, 8)\n"
            "try:\n"
            "    K.token_logprobs(h, W, torch.zeros(3, dtype=torch.long), tp_group=object(), impl='torch')\n"
            "except RuntimeError as e:\n"
            "    assert 'torch.distributed is not initialised' in str(e), e\n"
            "    print('RAISED')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "RAISED" in out.stdout, out.stderr

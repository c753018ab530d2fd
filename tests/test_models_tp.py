"""Tensor parallelism on CPU: two gloo processes (TP=2) against one process (TP=1).

Both load the same checkpoints with ``from_hf``; logits, vocab-parallel logit slices and every
gradient (gathered back to full tensors under HF names) must agree, and ``to_hf`` from TP=2
must write the source files back bit for bit.  The worker is this file run as a script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve()
VOCAB = 64


def _model_cfg(kind: str):
    from r4b.models import LMConfig, ModelConfig
    from r4b.models.vision import VisionConfig

    lm = LMConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                  tie_word_embeddings=kind == "mm")
    if kind == "text":
        return ModelConfig(lm=lm)
    vis = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, patch_size=4,
                       image_size=8, feature_layer=2)
    return ModelConfig(lm=lm, vision=vis, image_token_id=VOCAB - 1)


def _inputs(kind: str):
    g = torch.Generator().manual_seed(7)
    lens = [5, 9, 3]
    ids = torch.randint(0, VOCAB - 1, (sum(lens),), generator=g)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    images = None
    if kind == "mm":
        ids[6:10] = VOCAB - 1  # one 8-px image = 4 tokens in the second sequence
        images = torch.randn(1, 3, 8, 8, generator=g)
    weights = torch.randn(sum(lens), VOCAB, generator=g)
    batch = torch.randint(0, VOCAB - 1, (2, 6), generator=g)
    return ids, cu, images, weights, batch


def _run(model, kind: str):
    """Forward + backward of a fixed loss; returns logits, local logits, grads under HF names."""
    from r4b.models.hf import model_hf_state_dict

    ids, cu, images, weights, batch = _inputs(kind)
    logits = model(input_ids=ids, cu_seqlens=cu, images=images)
    local = model(input_ids=ids, cu_seqlens=cu, images=images, gather_logits=False)
    loss = (logits * weights).sum() + model(input_ids=batch).pow(2).mean()
    loss.backward()
    params = list(model.parameters())
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    grads = model_hf_state_dict(model)
    for p, d in zip(params, saved):
        p.data = d
    return logits.detach(), local.detach(), grads


def worker(root: Path, world: int, rank: int) -> None:
    """One rank: TP = ``world`` (the test process itself for TP=1, subprocesses for TP=2)."""
    from r4b.models import from_hf, init_model_parallel, to_hf

    init_model_parallel(world, 1, backend="gloo")
    for kind in ("text", "mm"):
        model = from_hf(root / f"src_{kind}", tp_size=world)
        logits, local, grads = _run(model, kind)
        out = {"logits": logits, "local": local, "vocab_start": torch.tensor(model.vocab_start),
               "head_local": model.lm_head_weight().detach().clone()}
        out.update({"grad." + k: v for k, v in grads.items()})
        save_file({k: v.contiguous() for k, v in out.items()},
                  str(root / f"out_{kind}_tp{world}_rank{rank}.safetensors"))
        to_hf(model, root / f"dst_{kind}_tp{world}")


def pp_worker(root: Path, rank: int) -> None:
    """One rank of PP=2: load a stage, run it, pass activations / gradients over gloo."""
    import torch.distributed as dist

    from r4b.models import from_hf, init_model_parallel, to_hf
    from r4b.models.hf import model_hf_state_dict
    from r4b.models.pipeline import allreduce_tied_embedding_grads

    init_model_parallel(1, 2, backend="gloo")
    for kind in ("text", "mm"):
        model = from_hf(root / f"src_{kind}")
        assert model.pre_process == (rank == 0) and model.post_process == (rank == 1)
        ids, cu, images, weights, _ = _inputs(kind)
        hidden = 64
        if rank == 0:
            out = model(input_ids=ids, cu_seqlens=cu, images=images)
            dist.send(out.detach().contiguous(), dst=1)
            g = torch.empty_like(out)
            dist.recv(g, src=1)
            out.backward(g)
        else:
            recv = torch.empty(ids.numel(), 1, hidden)
            dist.recv(recv, src=0)
            recv.requires_grad_()
            model.set_input_tensor(recv)
            logits = model(input_ids=ids, cu_seqlens=cu)
            (logits * weights).sum().backward()
            dist.send(recv.grad.contiguous(), dst=0)
            save_file({"logits": logits.detach()}, str(root / f"out_{kind}_pp2.safetensors"))
        allreduce_tied_embedding_grads(model)
        params = list(model.parameters())
        saved = [p.data for p in params]
        for p in params:
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        grads = model_hf_state_dict(model)
        for p, d in zip(params, saved):
            p.data = d
        save_file({k: v.contiguous() for k, v in grads.items()},
                  str(root / f"grad_{kind}_pp2_rank{rank}.safetensors"))
        to_hf(model, root / f"dst_{kind}_pp2", max_shard_bytes=10**9)


def _launch(root: Path, world: int, mode: str = "tp") -> None:
    from r4b.models.parallel import free_port

    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(HERE), str(root), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=180)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, o in zip(procs, outs):
        assert p.returncode == 0, f"worker failed (rc={p.returncode}):\n{o[-4000:]}"


def test_tp2_matches_tp1(tmp_path):
    from r4b.models import build_model, to_hf

    for kind in ("text", "mm"):
        torch.manual_seed(3)
        model = build_model(_model_cfg(kind))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        to_hf(model, tmp_path / f"src_{kind}")
    worker(tmp_path, 1, 0)  # TP=1 reference, in this process
    _launch(tmp_path, 2)
    for kind in ("text", "mm"):
        ref = load_file(str(tmp_path / f"out_{kind}_tp1_rank0.safetensors"))
        src = load_file(str(tmp_path / f"src_{kind}" / "model.safetensors"))
        for rank in range(2):
            got = load_file(str(tmp_path / f"out_{kind}_tp2_rank{rank}.safetensors"))
            torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
            v0 = int(got["vocab_start"])
            assert v0 == rank * VOCAB // 2 and got["local"].shape[-1] == VOCAB // 2
            torch.testing.assert_close(got["local"], ref["logits"][:, v0:v0 + VOCAB // 2],
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["head_local"], ref["head_local"][v0:v0 + VOCAB // 2],
                                       rtol=0, atol=0)
            grad_keys = sorted(k for k in ref if k.startswith("grad."))
            assert grad_keys == sorted(k for k in got if k.startswith("grad."))
            assert len(grad_keys) == len(src)
            for k in grad_keys:
                if "post_layernorm" not in k:  # unused: features come from the last block
                    assert ref[k].abs().sum() > 0, f"{k} has no gradient"
                # fp32 sums in a different order: tolerance relative to the tensor's scale
                atol = 2e-6 * (1.0 + ref[k].abs().max().item())
                torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=atol, msg=k)
        dst = load_file(str(tmp_path / f"dst_{kind}_tp2" / "model.safetensors"))
        assert sorted(dst) == sorted(src)
        for k in src:
            assert torch.equal(dst[k], src[k]), k


def test_pp2_stages_over_gloo(tmp_path):
    """Two pipeline stages in two processes: logits, gradients (tied embedding summed over the
    embedding group) and a split checkpoint write match the single-process model."""
    from r4b.models import build_model, from_hf, to_hf

    for kind in ("text", "mm"):
        torch.manual_seed(5)
        to_hf(build_model(_model_cfg(kind)), tmp_path / f"src_{kind}")
    _launch(tmp_path, 2, "pp")
    for kind in ("text", "mm"):
        ids, cu, images, weights, _ = _inputs(kind)
        model = from_hf(tmp_path / f"src_{kind}")
        logits = model(input_ids=ids, cu_seqlens=cu, images=images)
        (logits * weights).sum().backward()
        got = load_file(str(tmp_path / f"out_{kind}_pp2.safetensors"))["logits"]
        torch.testing.assert_close(got, logits.detach(), rtol=1e-5, atol=1e-5)
        from r4b.models.hf import model_hf_state_dict

        params = list(model.parameters())
        for p in params:
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        ref = model_hf_state_dict(model)
        stage = [load_file(str(tmp_path / f"grad_{kind}_pp2_rank{r}.safetensors")) for r in range(2)]
        assert set(stage[0]) | set(stage[1]) == set(ref)
        for k, v in ref.items():
            g = stage[0][k] if k in stage[0] else stage[1][k]
            atol = 2e-6 * (1.0 + v.abs().max().item())
            torch.testing.assert_close(g, v, rtol=1e-4, atol=atol, msg=k)
        dst = tmp_path / f"dst_{kind}_pp2"
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == 2  # one file per stage
        src = load_file(str(tmp_path / f"src_{kind}" / "model.safetensors"))
        back = {}
        for f in set(index["weight_map"].values()):
            back.update(load_file(str(dst / f)))
        assert sorted(back) == sorted(src) == sorted(index["weight_map"])
        assert all(torch.equal(back[k], src[k]) for k in src)
        assert json.loads((dst / "config.json").read_text()) == json.loads(
            (tmp_path / f"src_{kind}" / "config.json").read_text())


if __name__ == "__main__":
    if sys.argv[2] == "pp":
        pp_worker(Path(sys.argv[1]), int(os.environ["RANK"]))
    else:
        worker(Path(sys.argv[1]), int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]))

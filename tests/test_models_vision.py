"""SigLIP vision tower and projector: transformers parity, HF weight round trip, TP=2 == TP=1."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from safetensors.torch import load_file, save_file
from torch import nn

from r4b.models.vision import (
    LoadResult, Projector, SiglipVisionTower, VisionConfig, feature_layer_from_llava,
    feature_layer_to_llava,
)
from r4b.models.vision import _gather_hf, _HFEntry

TINY = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, patch_size=4,
            image_size=16)


def _siglip_classes():
    """transformers' SigLIP vision classes."""
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipVisionModel

    return SiglipVisionConfig, SiglipVisionModel


def _hf_tower(seed: int, *, use_head: bool = True, num_layers: int = TINY["num_layers"]):
    SiglipVisionConfig, SiglipVisionModel = _siglip_classes()
    torch.manual_seed(seed)
    hcfg = SiglipVisionConfig(
        hidden_size=TINY["hidden_size"], intermediate_size=TINY["intermediate_size"],
        num_hidden_layers=num_layers, num_attention_heads=TINY["num_heads"],
        patch_size=TINY["patch_size"], image_size=TINY["image_size"],
        vision_use_head=use_head, attn_implementation="eager")
    model = SiglipVisionModel(hcfg).eval()
    # transformers' init leaves biases / LayerNorms at 0 / 1: randomise every tensor so that a
    # misplaced bias or norm weight shows up in the comparison.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(1.0)
    return model


def _hf_grads(module) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) gradients under HF names."""
    table = {k: _HFEntry(e.param.grad, e.split_dim) for k, e in module._hf_table().items()
             if e.param.grad is not None}
    return _gather_hf(table, module.tp_group)


def _assert_grads_close(got: dict, want: dict, *, rel: float) -> None:
    """Every gradient within ``rel`` x the largest gradient entry of the model.

    A global scale, not a per-tensor one: some gradients are exactly zero in exact arithmetic
    (the key bias, since softmax ignores a per-query constant) and are pure rounding noise.
    """
    scale = max(v.abs().max().item() for v in want.values())
    for k, g in got.items():
        err = (g - want[k]).abs().max().item()
        assert err <= rel * scale, f"{k}: max abs error {err:.3g} > {rel * scale:.3g}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_dist(rank: int, world_size: int, port: int, tp: int) -> None:
    torch.distributed.init_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def _destroy_dist() -> None:
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _fresh_process_state() -> None:
    """Drop any process group an earlier test of this session left behind (building a model
    initialises a one-process group on demand)."""
    from r4b.models.parallel import destroy_model_parallel

    destroy_model_parallel()


@pytest.fixture
def single_process_tp():
    """torch.distributed (gloo, world size 1) + parallel_state with TP=1, torn down after."""
    _fresh_process_state()
    _init_dist(0, 1, _free_port(), 1)
    yield
    _destroy_dist()


@pytest.fixture(params=["no_dist", "gloo_tp1"])
def dist_mode(request):
    """Run a test without torch.distributed and with a single-process TP=1 group."""
    if request.param == "gloo_tp1":
        request.getfixturevalue("single_process_tp")
    else:
        _fresh_process_state()
    return request.param


# ---------------------------------------------------------------- config
def test_config_validation_and_tokens():
    cfg = VisionConfig(**TINY)
    assert cfg.tokens_per_image == 16 and cfg.head_dim == 16 and cfg.layers_run == 2
    with pytest.raises(ValueError, match="hidden_size must be divisible by num_heads=5"):
        VisionConfig(**{**TINY, "num_heads": 5})
    with pytest.raises(ValueError, match=r"image_size must be in \[4, inf\], got 3"):
        VisionConfig(**{**TINY, "image_size": 3})
    # A remainder is dropped by the strided patch conv (So400m/14@384 -> 27x27 patches).
    assert VisionConfig(**{**TINY, "image_size": 18}).tokens_per_image == 16
    assert VisionConfig(**{**TINY, "image_size": 384, "patch_size": 14}).tokens_per_image == 729
    with pytest.raises(ValueError, match="feature_layer"):
        VisionConfig(**TINY, feature_layer=3)
    with pytest.raises(ValueError, match="feature_layer"):
        VisionConfig(**TINY, feature_layer=-4)
    with pytest.raises(ValueError, match="projector_hidden_act"):
        VisionConfig(**TINY, projector_hidden_act="relu")
    with pytest.raises(ValueError, match="num_layers"):
        VisionConfig(**{**TINY, "num_layers": 0})
    assert VisionConfig(**TINY, feature_layer=-2).layers_run == 1
    assert VisionConfig(**TINY, feature_layer=0).layers_run == 0


def test_llava_feature_layer_mapping():
    assert feature_layer_from_llava(-1, 26) == 26
    assert feature_layer_from_llava(-2, 26) == -2
    assert feature_layer_from_llava(5, 26) == 5
    for v in (-1, -2, -27, 0, 3):
        assert feature_layer_to_llava(feature_layer_from_llava(v, 26), 26) == v
    assert feature_layer_to_llava(26, 26) == -1  # hidden_states[26] is hidden_states[-1]
    with pytest.raises(ValueError, match="post_layernorm"):
        feature_layer_to_llava(-1, 26)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        feature_layer_from_llava(-28, 26)
    with pytest.raises(TypeError, match="vision_feature_layer"):
        feature_layer_from_llava([-2, -1], 26)


# ---------------------------------------------------------------- parity with transformers
def test_parity_last_hidden_state_forward_backward(dist_mode):
    hf = _hf_tower(seed=1)
    tower = SiglipVisionTower(VisionConfig(**TINY))
    assert tower.load_hf_state_dict(hf.state_dict()) == LoadResult([], [])
    torch.manual_seed(2)
    pixels = torch.randn(3, 3, 16, 16)
    out_w = torch.randn(3, 16, 64)

    ours = tower(pixels)
    ref = hf(pixel_values=pixels).last_hidden_state
    assert ours.shape == (3, tower.cfg.tokens_per_image, 64)
    assert (ours - ref).abs().max().item() <= 1e-4

    (ours * out_w).sum().backward()
    (ref * out_w).sum().backward()
    ref_grads = {k: p.grad for k, p in hf.named_parameters() if not k.startswith("head.")}
    grads = _hf_grads(tower)
    assert set(grads) == set(ref_grads)
    _assert_grads_close(grads, ref_grads, rel=1e-5)


@pytest.mark.parametrize("feature_layer", [0, 1, 2, -2, -3, "llava:-1", "llava:-2"])
def test_parity_feature_layer(feature_layer):
    hf = _hf_tower(seed=3, num_layers=2)
    if isinstance(feature_layer, str):
        hf_index = int(feature_layer.split(":")[1])
        fl = feature_layer_from_llava(hf_index, 2)
    else:
        hf_index = fl = feature_layer
    tower = SiglipVisionTower(VisionConfig(**TINY, feature_layer=fl))
    tower.load_hf_state_dict(hf.state_dict())
    torch.manual_seed(4)
    pixels = torch.randn(2, 3, 16, 16)
    ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[hf_index]
    ours = tower(pixels)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_hidden_states_minus_one_is_not_post_normed():
    """Guards the documented mapping: HF hidden_states[-1] differs from last_hidden_state."""
    hf = _hf_tower(seed=5)
    pixels = torch.randn(2, 3, 16, 16)
    out = hf(pixel_values=pixels, output_hidden_states=True)
    assert (out.hidden_states[-1] - out.last_hidden_state).abs().max().item() > 1e-2


# ---------------------------------------------------------------- HF state dict
@pytest.mark.parametrize("use_head", [True, False])
def test_hf_state_dict_round_trip_bit_exact(use_head):
    hf = _hf_tower(seed=6, use_head=use_head)
    ref = hf.state_dict()
    assert any(k.startswith("head.") for k in ref) == use_head
    tower = SiglipVisionTower(VisionConfig(**TINY))
    tower.load_hf_state_dict(ref)
    sd = tower.hf_state_dict()
    assert sorted(sd) == sorted(ref)
    for k, v in ref.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    # returned tensors are copies: editing them leaves the module alone
    sd["post_layernorm.weight"].zero_()
    sd["head.probe" if use_head else "post_layernorm.bias"].zero_()
    again = tower.hf_state_dict()
    assert torch.equal(again["post_layernorm.weight"], ref["post_layernorm.weight"])
    assert torch.equal(again["head.probe" if use_head else "post_layernorm.bias"],
                       ref["head.probe" if use_head else "post_layernorm.bias"])


def test_hf_names_match_transformers():
    hf = _hf_tower(seed=7, use_head=False)
    tower = SiglipVisionTower(VisionConfig(**TINY))
    assert sorted(tower.hf_state_dict()) == sorted(hf.state_dict())


def test_strict_errors_list_every_key():
    hf = _hf_tower(seed=8, use_head=False)
    tower = SiglipVisionTower(VisionConfig(**TINY))
    before = tower.hf_state_dict()
    sd = dict(hf.state_dict())
    del sd["encoder.layers.1.mlp.fc2.bias"], sd["embeddings.position_embedding.weight"]
    sd["encoder.layers.2.mlp.fc1.weight"] = torch.zeros(128, 64)
    sd["bogus"] = torch.zeros(1)
    with pytest.raises(KeyError) as ei:
        tower.load_hf_state_dict(sd)
    msg = str(ei.value)
    for k in ("encoder.layers.1.mlp.fc2.bias", "embeddings.position_embedding.weight",
              "encoder.layers.2.mlp.fc1.weight", "bogus"):
        assert k in msg
    # nothing was copied by the failed load
    after = tower.hf_state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)

    # non-strict: loads what is there, reports the rest
    res = tower.load_hf_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["embeddings.position_embedding.weight",
                                        "encoder.layers.1.mlp.fc2.bias"]
    assert sorted(res.unexpected_keys) == ["bogus", "encoder.layers.2.mlp.fc1.weight"]
    loaded = tower.hf_state_dict()
    assert torch.equal(loaded["encoder.layers.0.self_attn.q_proj.weight"],
                       sd["encoder.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(loaded["embeddings.position_embedding.weight"],
                       before["embeddings.position_embedding.weight"])

    # shape mismatches raise ValueError even when not strict, listing each
    bad = dict(hf.state_dict())
    bad["encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 63)
    bad["post_layernorm.bias"] = torch.zeros(65)
    for strict in (True, False):
        with pytest.raises(ValueError) as ei:
            tower.load_hf_state_dict(bad, strict=strict)
        msg = str(ei.value)
        assert "encoder.layers.0.self_attn.k_proj.weight: expected (64, 64), got (64, 63)" in msg
        assert "post_layernorm.bias: expected (64,), got (65,)" in msg


def test_projector_strict_errors():
    proj = Projector(64, 32)
    sd = proj.hf_state_dict()
    assert sorted(sd) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight",
                          "pre_norm.bias", "pre_norm.weight"]
    del sd["linear_2.bias"]
    sd["extra"] = torch.zeros(2)
    with pytest.raises(KeyError, match=r"linear_2\.bias.*extra"):
        proj.load_hf_state_dict(sd)
    sd = proj.hf_state_dict()
    sd["linear_1.weight"] = torch.zeros(32, 65)
    with pytest.raises(ValueError, match=r"linear_1\.weight: expected \(32, 64\), got \(32, 65\)"):
        proj.load_hf_state_dict(sd)
    assert sorted(Projector(64, 32, pre_norm=False).hf_state_dict()) == [
        "linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]


# ---------------------------------------------------------------- projector
class _RefProjector(nn.Module):
    def __init__(self, vh, lh, eps, act):
        super().__init__()
        self.pre_norm = nn.LayerNorm(vh, eps=eps)
        self.linear_1 = nn.Linear(vh, lh)
        self.linear_2 = nn.Linear(lh, lh)
        self.approx = "tanh" if act == "gelu_pytorch_tanh" else "none"

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(self.pre_norm(x)), approximate=self.approx))


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("lead", [(), (7,), (2, 5), (2, 3, 5)])
def test_projector_matches_reference(dist_mode, act, lead):
    torch.manual_seed(9)
    ref = _RefProjector(24, 40, 1e-5, act)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    proj = Projector(24, 40, eps=1e-5, act=act)
    proj.load_hf_state_dict(ref.state_dict())
    x = torch.randn(*lead, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = proj(x), ref(x_ref)
    assert out.shape == (*lead, 40)
    assert (out - out_ref).abs().max().item() <= 1e-5
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-5
    grads = _hf_grads(proj)
    for k, p in ref.named_parameters():
        assert (grads[k] - p.grad).abs().max().item() <= 1e-4, k


def test_projector_gelu_differs_from_tanh_variant():
    """The two activation choices are really different functions."""
    torch.manual_seed(10)
    a = Projector(8, 16, act="gelu")
    b = Projector(8, 16, act="gelu_pytorch_tanh")
    b.load_hf_state_dict(a.hf_state_dict())
    x = torch.randn(4, 8) * 3
    assert (a(x) - b(x)).abs().max().item() > 1e-6


def test_projector_without_pre_norm():
    torch.manual_seed(11)
    proj = Projector(16, 8, pre_norm=False)
    x = torch.randn(3, 16)
    sd = proj.hf_state_dict()
    want = F.linear(F.gelu(F.linear(x, sd["linear_1.weight"], sd["linear_1.bias"])),
                    sd["linear_2.weight"], sd["linear_2.bias"])
    assert (proj(x) - want).abs().max().item() <= 1e-6


def test_projector_bad_input():
    proj = Projector(16, 8)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 16\].*got \(3, 15\)"):
        proj(torch.randn(3, 15))
    with pytest.raises(ValueError, match="act"):
        Projector(16, 8, act="swish")
    with pytest.raises(ValueError, match="lm_hidden"):
        Projector(16, 0)


# ---------------------------------------------------------------- bad pixel input
@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (2, 3, 32, 32), (2, 3, 16, 12), (3, 16, 16)])
def test_tower_rejects_bad_pixel_shape(shape):
    tower = SiglipVisionTower(VisionConfig(**TINY))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[N, 3, 16, 16\]") as ei:
        tower(torch.randn(*shape))
    assert str(tuple(shape)) in str(ei.value)


def test_tower_rejects_integer_pixels():
    tower = SiglipVisionTower(VisionConfig(**TINY))
    with pytest.raises(TypeError, match="pixel_values must be a floating-point"):
        tower(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


# ---------------------------------------------------------------- TP=2 == TP=1
LM_HIDDEN = 48


def _tp_worker(rank: int, world_size: int, port: int, workdir: str) -> None:
    _init_dist(rank, world_size, port, world_size)
    try:
        data = load_file(f"{workdir}/inputs.safetensors")
        tower_sd = {k[len("tower."):]: v for k, v in data.items() if k.startswith("tower.")}
        proj_sd = {k[len("proj."):]: v for k, v in data.items() if k.startswith("proj.")}
        tower = SiglipVisionTower(VisionConfig(**TINY))
        proj = Projector(64, LM_HIDDEN)
        tower.load_hf_state_dict(tower_sd)
        proj.load_hf_state_dict(proj_sd)
        tp_msg = "must be divisible by the tensor-parallel size 2"
        with pytest.raises(ValueError, match=rf"vision tower's num_heads \(vision.num_heads\) {tp_msg}, got 1"):
            SiglipVisionTower(VisionConfig(**{**TINY, "num_heads": 1}))
        with pytest.raises(ValueError, match=rf"vision tower's MLP width \(vision.intermediate_size\) {tp_msg}, got 127"):
            SiglipVisionTower(VisionConfig(**{**TINY, "intermediate_size": 127}))
        with pytest.raises(ValueError, match=rf"projector's output width \(the language model's hidden_size\) {tp_msg}, got 47"):
            Projector(64, 47)
        # each rank holds half of the heads / MLP columns
        attn = tower.layers[0].self_attn
        assert attn.heads_per_rank == TINY["num_heads"] // world_size
        assert attn.q_proj.weight.shape == (64 // world_size, 64)
        assert tower.layers[0].mlp.fc2.weight.shape == (64, 128 // world_size)
        assert proj.linear_1.weight.shape == (LM_HIDDEN // world_size, 64)
        feats = tower(data["pixels"])
        out = proj(feats)
        (out * data["out_w"]).sum().backward()
        result = {"feats": feats.detach(), "out": out.detach()}
        result.update({f"grad.tower.{k}": v for k, v in _hf_grads(tower).items()})
        result.update({f"grad.proj.{k}": v for k, v in _hf_grads(proj).items()})
        result.update({f"sd.tower.{k}": v for k, v in tower.hf_state_dict().items()})
        result.update({f"sd.proj.{k}": v for k, v in proj.hf_state_dict().items()})
        save_file({k: v.contiguous() for k, v in result.items()},
                  f"{workdir}/rank{rank}.safetensors")
    finally:
        _destroy_dist()


def test_tp2_matches_tp1(tmp_path):
    torch.manual_seed(12)
    tower_sd = _hf_tower(seed=12, use_head=False).state_dict()
    proj_sd = {}
    for k, v in Projector(64, LM_HIDDEN).hf_state_dict().items():
        proj_sd[k] = v + torch.randn_like(v) * 0.1
    pixels = torch.randn(3, 3, 16, 16)
    out_w = torch.randn(3, 16, LM_HIDDEN)
    inputs = {"pixels": pixels, "out_w": out_w, **{f"tower.{k}": v for k, v in tower_sd.items()},
              **{f"proj.{k}": v for k, v in proj_sd.items()}}
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp_path / "inputs.safetensors"))

    # TP=1 reference, single process
    tower = SiglipVisionTower(VisionConfig(**TINY))
    proj = Projector(64, LM_HIDDEN)
    tower.load_hf_state_dict(tower_sd)
    proj.load_hf_state_dict(proj_sd)
    feats = tower(pixels)
    out = proj(feats)
    (out * out_w).sum().backward()
    ref_grads = {**{f"tower.{k}": v for k, v in _hf_grads(tower).items()},
                 **{f"proj.{k}": v for k, v in _hf_grads(proj).items()}}

    torch.multiprocessing.spawn(_tp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                                join=True)
    for rank in range(2):
        res = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert (res["feats"] - feats).abs().max().item() <= 1e-5
        assert (res["out"] - out).abs().max().item() <= 1e-5
        grads = {k[len("grad."):]: v for k, v in res.items() if k.startswith("grad.")}
        assert set(grads) == set(ref_grads)
        _assert_grads_close(grads, ref_grads, rel=1e-6)
        # gathered hf_state_dict reproduces the loaded full weights bit for bit
        for k, v in {**{f"tower.{k}": v for k, v in tower_sd.items()},
                     **{f"proj.{k}": v for k, v in proj_sd.items()}}.items():
            assert torch.equal(res[f"sd.{k}"], v), k

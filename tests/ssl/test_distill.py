"""GPFM's expert distillation (pipeline.ssl.distill): the losses by hand, frozen experts,
trained heads, and `cpath pretrain` runs with two experts (one resumed, one on 2 DDP
processes)."""

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.cli import main
from pipeline.encoders import load_encoder
from pipeline.ssl.config import DistillConfig, ExpertConfig, LossConfig, ModelConfig, OptimConfig
from pipeline.ssl.distill import (
    cosine_loss,
    expert_tokens,
    load_expert,
    patch_loss,
    renormalize,
    resize_grid,
)
from pipeline.ssl.export import save_encoder
from pipeline.ssl.module import DINOv2Module
from pipeline.ssl.train import read_metrics
from tests.ssl.tiny_fit import fit, tiny_data

ROOT = Path(__file__).resolve().parents[2]
TINY_STUDENT = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}
DATA_MEAN, DATA_STD = (0.5, 0.4, 0.3), (0.2, 0.1, 0.25)


def write_expert(folder: Path, seed: int, img: int, patch: int, dim: int, mean, std, reg=0):
    """A tiny timm ViT (random weights of ``seed``) as an exported encoder folder."""
    args = {
        "num_classes": 0,
        "dynamic_img_size": True,
        "img_size": img,
        "patch_size": patch,
        "depth": 1,
        "embed_dim": dim,
        "num_heads": 2,
        **({"reg_tokens": reg} if reg else {}),
    }
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", **args)
    return save_encoder(vit.state_dict(), "vit_tiny_patch16_224", args, folder, img, mean, std)


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, Path]:
    """Two experts unlike the student and each other: 32 px / patch 8 (4 x 4 grid, 24 wide,
    mean = std = 0.5) and 24 px / patch 4 with a register (6 x 6 grid, 12 wide, ImageNet)."""
    root = tmp_path_factory.mktemp("experts")
    return {
        "a": write_expert(root / "a", 1, 32, 8, 24, (0.5,) * 3, (0.5,) * 3),
        "b": write_expert(
            root / "b", 2, 24, 4, 12, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), reg=1
        ),
    }


def distill_cfg(experts: dict[str, Path]) -> DistillConfig:
    return DistillConfig(
        experts=[
            ExpertConfig("a", str(experts["a"]), cls_weight=1.0, patch_weight=0.25),
            ExpertConfig("b", str(experts["b"]), cls_weight=0.5, patch_weight=0.0),
        ],
        head_bottleneck=8,
    )


# -- the losses by hand -------------------------------------------------------------------
def test_cosine_loss_is_one_minus_the_mean_cosine():
    s = torch.tensor([[1.0, 0.0], [2.0, 2.0], [1.0, 0.0]])
    t = torch.tensor([[0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])  # cosines 0, 1, -1
    assert float(cosine_loss(s, t)) == pytest.approx(1 - (0 + 1 - 1) / 3)
    assert float(cosine_loss(5 * s, t)) == pytest.approx(float(cosine_loss(s, t)))


def test_patch_loss_mixes_cosine_and_smooth_l1_nine_to_one():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # 1 x 2 x 2
    t = torch.tensor([[[1.0, 0.5], [0.0, -1.0]]])
    cos = (1 / math.sqrt(1.25) + -1) / 2
    # SmoothL1 (beta 1): 0.5 d^2 below 1, |d| - 0.5 above; d = 0, -0.5, 0, 3
    smooth = (0 + 0.5 * 0.25 + 0 + (3 - 0.5)) / 4
    assert float(patch_loss(s, t)) == pytest.approx(0.9 * (1 - cos) + 0.1 * smooth)


def grid_tokens(values: torch.Tensor) -> torch.Tensor:
    """``B x C x h x w`` -> ``B x (h w) x C`` tokens, row-major, by explicit loops."""
    b, c, h, w = values.shape
    out = torch.empty(b, h * w, c)
    for i in range(h):
        for j in range(w):
            out[:, i * w + j] = values[:, :, i, j]
    return out


@pytest.mark.parametrize(
    ("grid", "size"), [((14, 14), (16, 16)), ((4, 6), (2, 3)), ((3, 5), (6, 4))]
)
def test_resize_grid_is_bicubic_on_the_row_major_grid(grid, size):
    h, w = grid
    i = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    j = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    values = torch.stack([10 * i + j, (i - 2 * j) ** 2, torch.sin(i) * j])[None]  # 1 x 3 x h x w
    values = torch.cat([values, -values])  # 2 x 3 x h x w
    expected = F.interpolate(values, size=size, mode="bicubic", align_corners=False)
    out = resize_grid(grid_tokens(values), grid, size)  # 2 x (h' w') x 3
    assert torch.allclose(out, grid_tokens(expected), atol=1e-5)
    # a transpose-free reshape (a plausible slip) reads the grid in the wrong order
    wrong = grid_tokens(values).reshape(2, 3, h, w)
    wrong = F.interpolate(wrong, size=size, mode="bicubic", align_corners=False)
    assert not torch.allclose(out, wrong.flatten(2).transpose(1, 2), atol=1e-3)
    if h == w:  # GPFM's FeatureLoss on square grids: the same
        tokens = grid_tokens(values)
        gpfm = tokens.permute(0, 2, 1).reshape(2, 3, h, w)
        gpfm = F.interpolate(gpfm, size=size, mode="bicubic").reshape(2, 3, -1).permute(0, 2, 1)
        assert torch.allclose(out, gpfm, atol=1e-6)


def test_renormalize_undoes_the_data_normalisation_and_applies_the_experts():
    pixel = torch.tensor([0.6, 0.2, 0.9]).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    mean, std = torch.tensor(DATA_MEAN).view(1, 3, 1, 1), torch.tensor(DATA_STD).view(1, 3, 1, 1)
    crops = (pixel - mean) / std  # as the data module normalises them
    expert_mean, expert_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = renormalize(crops, DATA_MEAN, DATA_STD, expert_mean, expert_std, size=16)
    assert out.shape == (2, 3, 16, 16)  # constant crops: the resize changes no value
    by_hand = [(0.6 - 0.485) / 0.229, (0.2 - 0.456) / 0.224, (0.9 - 0.406) / 0.225]
    assert out[0, :, 5, 7].tolist() == pytest.approx(by_hand, abs=1e-5)
    assert by_hand == pytest.approx([0.502183, -1.142857, 2.195556], abs=1e-6)
    same = renormalize(crops, DATA_MEAN, DATA_STD, DATA_MEAN, DATA_STD)
    assert torch.allclose(same, crops, atol=1e-6)


def test_expert_tokens_are_the_encoders_own(experts):
    """The class token and the patch grid of an expert are those of the encoder that
    `cpath extract` loads, fed the crops in its own normalisation and size."""
    expert = load_expert(ExpertConfig("b", str(experts["b"])))
    encoder = load_encoder(experts["b"])
    torch.manual_seed(0)
    pixels = torch.rand(3, 3, 16, 16)
    mean, std = torch.tensor(DATA_MEAN).view(1, 3, 1, 1), torch.tensor(DATA_STD).view(1, 3, 1, 1)
    cls, patches, grid = expert((pixels - mean) / std, DATA_MEAN, DATA_STD)
    x = F.interpolate(pixels, size=(24, 24), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(encoder.mean).view(1, 3, 1, 1)) / torch.tensor(encoder.std).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        tokens = encoder.model.forward_features(x)  # 3 x (1 + 1 + 36) x 12
        embedding = encoder.model(x)
    assert (expert.dim, expert.prefix, grid) == (12, 2, (6, 6))
    assert torch.allclose(cls, tokens[:, 0], atol=1e-5)
    assert torch.allclose(cls, embedding, atol=1e-5)  # the encoder's own embedding
    assert torch.allclose(patches, tokens[:, 2:], atol=1e-5)  # the register left out


def test_zoo_transformers_expert_gives_its_last_hidden_state():
    pytest.importorskip("transformers")
    from pipeline.encoders import build_zoo_model

    net = build_zoo_model("phikon", depth=1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = expert_tokens(net, x)  # 1 x (1 + 196) x 768
        assert torch.allclose(tokens[:, 0], net(x), atol=1e-5)
    assert tokens.shape == (1, 197, 768)


def test_bad_experts_fail_with_clear_messages(experts, tmp_path):
    with pytest.raises(Exception, match="not both 0"):
        load_expert(ExpertConfig("a", str(experts["a"]), cls_weight=0, patch_weight=0))
    with pytest.raises(Exception, match="letters, digits"):
        load_expert(ExpertConfig("a.b", str(experts["a"])))
    with pytest.raises(Exception, match="random-init"):
        load_expert(ExpertConfig("r", "timm:vit_tiny_patch16_224"))


def test_gpfm_preset_is_vitl14_with_uni_and_phikon_at_gpfms_weights():
    import yaml

    from pipeline.config import load_config
    from pipeline.ssl.pretrain import PretrainConfig

    presets = ROOT / "configs" / "pretrain"
    raw = {n: yaml.safe_load((presets / f"{n}.yaml").read_text()) for n in ("gpfm", "vitl14")}
    assert raw["gpfm"]["model"] == raw["vitl14"]["model"]
    cfg = load_config(PretrainConfig, presets / "gpfm.yaml")
    weights = {e.encoder: (e.cls_weight, e.patch_weight) for e in cfg.distill.experts}
    assert weights == {"uni": (1.0, 0.25), "phikon": (0.5, 0.125)}
    assert cfg.distill.head_bottleneck == 256


# -- training -----------------------------------------------------------------------------
def tiny_module(experts, max_steps: int = 2, loss: dict | None = None) -> DINOv2Module:
    model = ModelConfig(
        arch="vit_tiny_patch16_224",
        arch_kwargs=dict(TINY_STUDENT),
        drop_path_rate=0.0,
        prototypes=16,
        head_hidden=16,
        head_bottleneck=8,
        head_layers=2,
    )
    optim = OptimConfig(warmup_steps=1, freeze_last_layer_steps=0, base_lr=0.05)
    data = tiny_data(global_size=16, local_size=8, mean=DATA_MEAN, std=DATA_STD)
    return DINOv2Module.from_configs(
        model, LossConfig(**(loss or {})), optim, max_steps, data=data, distill=distill_cfg(experts)
    )


@pytest.mark.parametrize("ibot_weight", [0.0, 1.0])
def test_every_head_parameter_gets_a_gradient_and_no_expert_one(experts, ibot_weight, one_thread):
    """DDP (``find_unused_parameters=False``) fails on a trainable parameter without a
    gradient: expert a has both terms, b the class-token term only (its head still gets one);
    the expert never gets a gradient. Masked or not, the student's patch tokens are used."""
    module = tiny_module(experts, loss={"ibot_weight": ibot_weight})
    torch.manual_seed(0)
    batch = {
        "global": torch.randn(4, 3, 16, 16),  # 2B x 3 x G x G
        "local": torch.randn(4, 3, 8, 8),
        "masks": torch.tensor([[True, False, True, False]] * 2 + [[False] * 4] * 2),
    }
    terms, _, _ = module.ssl_losses(batch, teacher_temp=0.04)
    assert {k for k in terms if k.startswith("distill")} == {
        "distill_cls/a",
        "distill_patch/a",
        "distill_cls/b",
    }
    assert set(module.distill_ms) == {"a", "b"}
    sum(terms.values()).backward()
    missing = [
        n for n, p in module.trainable_named_parameters() if p.requires_grad and p.grad is None
    ]
    assert missing == []
    assert all(p.grad is None for e in module.experts for p in e.encoder.model.parameters())


def test_experts_stay_frozen_and_out_of_the_checkpoint_while_the_heads_train(
    experts, tmp_path, one_thread
):
    module = tiny_module(experts)
    frozen = {
        e.name: {k: v.clone() for k, v in e.encoder.model.state_dict().items()}
        for e in module.experts
    }
    heads = {k: v.clone() for k, v in module.distill_heads.state_dict().items()}
    assert {n: h.last_layer.weight_v.shape[0] for n, h in module.distill_heads.items()} == {
        "a": 24,
        "b": 12,
    }
    data = tiny_data(global_size=16, local_size=8, mean=DATA_MEAN, std=DATA_STD)
    ckpt = fit(module, data, LossConfig(), tmp_path, steps=2)
    for expert in module.experts:
        model = expert.encoder.model
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        for k, v in model.state_dict().items():
            assert torch.equal(v, frozen[expert.name][k]), k  # bit-identical
    changed = [
        k for k, v in module.distill_heads.state_dict().items() if not torch.equal(v, heads[k])
    ]
    assert {k.split(".")[0] for k in changed} == {"a", "b"}
    assert any(k.startswith("a.mlp.0.weight") for k in changed)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    keys = list(state["state_dict"])
    parts = {"student", "teacher", "distill_heads", "dino_targets", "ibot_targets"}
    assert {k.split(".")[0] for k in keys} <= parts  # no expert weights
    assert sum(k.startswith("distill_heads.") for k in keys) == 8  # 4 tensors per head
    optimized = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    trainable = [p for _, p in module.trainable_named_parameters() if p.requires_grad]
    assert optimized == {id(p) for p in trainable}
    assert not optimized & {id(p) for e in module.experts for p in e.encoder.model.parameters()}
    assert state["hyper_parameters"]["distill"]["experts"][0]["encoder"] == str(experts["a"])


@pytest.fixture(scope="module")
def cmu_coords(tmp_path_factory, cmu_svs) -> Path:
    """A coords folder of every 128-px (level 0) tile of the real CMU slide, read at 64 px."""
    from pipeline.wsi.coords import write_coords

    out = tmp_path_factory.mktemp("cmu_coords")
    xy = np.array([(x, y) for y in range(0, 2967 - 128, 128) for x in range(0, 2220 - 128, 128)])
    attrs = {
        "slide_id": "cmu",
        "slide_path": str(cmu_svs),
        "patch_size_level0": 128,
        "patch_size": 64,
        "target_mpp": 0.998,
        "level0_mpp": 0.499,
    }
    write_coords(out / "cmu.h5", xy, np.ones(len(xy)), attrs)
    return out


def pretrain_argv(coords: Path, out: Path, experts: dict[str, Path], steps: int, *extra):
    spec = [
        {"name": "a", "encoder": str(experts["a"]), "cls_weight": 1.0, "patch_weight": 0.25},
        {"name": "b", "encoder": str(experts["b"]), "cls_weight": 0.5, "patch_weight": 0.125},
    ]
    return [
        "pretrain",
        "--config",
        str(ROOT / "configs" / "pretrain" / "tiny-cpu.yaml"),
        "--data.coords",
        str(coords),
        "--out",
        str(out),
        "--model.arch_kwargs",
        '{"img_size": 64, "patch_size": 8, "depth": 1}',
        "--data.batch_size",
        "2",
        "--data.workers",
        "0",
        "--data.local_crops",
        "1",
        "--trainer.max_steps",
        str(steps),
        "--trainer.ckpt_every_n_steps",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.progress_bar",
        "false",
        "--distill.experts",
        json.dumps(spec),
        "--distill.head_bottleneck",
        "8",
        *extra,
    ]


def check_run(out: Path, steps: int) -> None:
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [int(r["step"]) for r in rows] == list(range(steps))
    for name in ("a", "b"):
        for key in (f"loss/distill_cls/{name}", f"loss/distill_patch/{name}"):
            assert all(math.isfinite(r[key]) for r in rows), key
        assert all(r[f"distill/expert_ms/{name}"] > 0 for r in rows)
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == steps
    parts = {"student", "teacher", "distill_heads", "dino_targets", "ibot_targets"}
    assert {k.split(".")[0] for k in state["state_dict"]} <= parts  # no expert weights
    assert any(k.startswith("distill_heads.b.") for k in state["state_dict"])
    assert (out / "encoder" / "model.safetensors").is_file()


@pytest.mark.filterwarnings("ignore:Experiment logs directory")  # the resumed run's logs
def test_pretrain_with_two_experts_logs_the_terms_and_resumes(
    experts, cmu_coords, tmp_path, one_thread
):
    """`cpath pretrain --distill.experts` with two experts for 2 steps, resumed to 4."""
    out = tmp_path / "run"
    assert main(pretrain_argv(cmu_coords, out, experts, 2)) == 0
    heads = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert main(pretrain_argv(cmu_coords, out, experts, 4, "--ckpt_path", "last")) == 0
    with open(out / "logs" / "metrics.csv") as f:  # the resumed run logged steps 2 and 3 only
        steps = {int(float(r["step"])) for r in csv.DictReader(f) if r.get("loss")}
    assert steps == {2, 3}
    check_run(out, 4)
    resumed = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    key = "distill_heads.a.mlp.0.weight"
    assert not torch.equal(heads["state_dict"][key], resumed["state_dict"][key])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 2 processes that import torch, timm and Lightning
def test_pretrain_with_two_experts_on_two_ddp_processes(experts, cmu_coords, tmp_path):
    """The same on 2 CPU processes (DDP, gloo): every head parameter gets a gradient on
    every rank (DDP fails otherwise), the experts stay outside DDP's parameters."""
    out = tmp_path / "run"
    argv = pretrain_argv(
        cmu_coords, out, experts, 2, "--trainer.devices", "2", "--trainer.strategy", "ddp"
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    check_run(out, 2)

"""``--model.init_from``: timm state dicts, exported encoders, ``cpath pretrain`` checkpoints
and checkpoints in the layout of Meta's DINOv2 code (Oquab et al., 2024) start the student
and teacher, with a patch grid of another size resampled."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from pipeline.errors import ConfigError, PipelineError
from pipeline.ssl.config import LossConfig, ModelConfig, OptimConfig
from pipeline.ssl.export import export_encoder
from pipeline.ssl.models import MaskedViT, SSLNetwork
from pipeline.ssl.module import DINOv2Module
from tests.ssl.tiny_fit import TINY14, TINY_HEADS, fit, tiny_data

REGS = 4
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/ssl/conftest.py

MODEL = {
    "arch": "vit_small_patch16_224",
    "arch_kwargs": {"img_size": 224, **TINY14},
    "reg_tokens": REGS,
    "drop_path_rate": 0.0,
    "separate_ibot_head": True,
    **TINY_HEADS,
}


def module(**model) -> DINOv2Module:
    cfg = ModelConfig(**{**MODEL, **model})
    return DINOv2Module.from_configs(cfg, LossConfig(), OptimConfig(warmup_steps=2), 10)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run of the tiny 224-px model (16 x 16 grid, 4 registers, LayerScale) and its
    checkpoint."""
    out = tmp_path_factory.mktemp("init_run")
    torch.manual_seed(0)
    trained = module()
    ckpt = fit(trained, tiny_data(), LossConfig(), out, steps=2)
    return trained, ckpt


def features(backbone: MaskedViT, images: torch.Tensor) -> torch.Tensor:
    cls, patches = backbone.eval()(images)  # B x D, B x N x D
    return torch.cat([cls[:, None], patches], dim=1)


def randomize(network: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerScale and heads included): a wrong map shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def dinov2_layout(network: SSLNetwork, chunks: int = 2) -> dict[str, torch.Tensor]:
    """``network`` as Meta's DINOv2 code saves it: ``backbone.`` prefixes, blocks in FSDP
    chunks (``blocks.CHUNK.I``), ``register_tokens`` without positions (``pos_embed`` is the
    class position and the grid), ``ls1.gamma``, the SwiGLU's ``w12`` / ``w3``, the mask token
    and both heads."""
    vit = network.backbone.vit
    per_chunk = len(vit.blocks) // chunks
    swiglu = type(vit.blocks[0].mlp).__name__ == "GluMlp"  # timm's SwiGLUPacked
    out = {}
    for name, value in vit.state_dict().items():
        if name == "reg_token":
            name = "register_tokens"
        elif name == "pos_embed":
            value = torch.cat([value[:, :1], value[:, 1 + REGS :]], dim=1)  # 1 x (1 + N) x D
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            if swiglu:
                rest = rest.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
            name = f"blocks.{int(i) // per_chunk}.{i}.{rest}"
        out[f"backbone.{name}"] = value.clone()
    out["backbone.mask_token"] = network.backbone.mask_token.detach().clone()
    for head in ("dino_head", "ibot_head"):
        for name, value in getattr(network, head).state_dict().items():
            out[f"{head}.{name}"] = value.clone()
    return out


TARGETS = {  # model fields, timm arguments
    "embed_class": ({}, {}),
    "no_embed_class": ({}, {"no_embed_class": True}),  # timm's DINOv2-with-registers layout
    "swiglu": ({"arch": "vit_giant_patch14_dinov2"}, {}),  # DINOv2's w12 / w3 feed-forward
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_a_dinov2_checkpoint_with_another_grid_loads_with_the_same_features(tmp_path, target):
    """A 37 x 37 grid (DINOv2's 518 px) into a 224-px model (16 x 16): the loaded model gives
    the features the source model gives at 224 px, where timm resamples its grid per input."""
    fields, extra = TARGETS[target]
    sources = {}  # DINOv2's own networks: a class position, none for the registers
    for seed, branch in enumerate(("student", "teacher")):
        source = module(**fields, arch_kwargs={**MODEL["arch_kwargs"], "img_size": 518}).student
        randomize(source, seed)
        with torch.no_grad():
            source.backbone.vit.pos_embed[:, 1 : 1 + REGS] = 0
        sources[branch] = source
    ckpt = tmp_path / "dinov2.pth"
    torch.save({k: dinov2_layout(v) for k, v in sources.items()}, ckpt)
    written = torch.load(ckpt)["teacher"]
    assert "backbone.blocks.1.1.ls1.gamma" in written and "backbone.register_tokens" in written
    assert (target == "swiglu") == ("backbone.blocks.0.0.mlp.w12.weight" in written)

    loaded = module(**fields, arch_kwargs={**MODEL["arch_kwargs"], **extra}, init_from=str(ckpt))
    report = loaded.init_report
    assert report.kind == "dinov2" and report.resampled == ((37, 37), (16, 16))
    assert report.fresh == [] and report.dropped == []
    images = torch.randn(2, 3, 224, 224)
    for branch, source in sources.items():
        network = getattr(loaded, branch)
        prefix = 0 if extra else 1 + REGS
        assert network.backbone.vit.pos_embed.shape[1] == prefix + 16 * 16
        torch.testing.assert_close(
            features(network.backbone, images),
            features(source.backbone, images),
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(network.backbone.mask_token, source.backbone.mask_token)
        for head in ("dino_head", "ibot_head"):
            for (name, a), b in zip(
                getattr(network, head).state_dict().items(),
                getattr(source, head).state_dict().values(),
                strict=True,
            ):
                torch.testing.assert_close(a, b, msg=f"{branch} {head}.{name}")


def test_the_grid_is_resampled_bicubically_with_the_class_position_kept(tmp_path):
    source = module(arch_kwargs={**MODEL["arch_kwargs"], "img_size": 518}).student
    randomize(source, 3)
    ckpt = tmp_path / "dinov2.pth"
    torch.save({"teacher": dinov2_layout(source)}, ckpt)  # a teacher-only release
    loaded = module(init_from=str(ckpt))
    pos = loaded.teacher.backbone.vit.pos_embed  # 1 x (1 + 4 + 256) x D
    src = dinov2_layout(source)["backbone.pos_embed"]  # 1 x (1 + 37 * 37) x D
    torch.testing.assert_close(pos[:, :1], src[:, :1])  # class position unchanged
    assert torch.all(pos[:, 1 : 1 + REGS] == 0)  # registers: no position, as in DINOv2
    grid = resample_abs_pos_embed(src[:, 1:], [16, 16], [37, 37], num_prefix_tokens=0)
    torch.testing.assert_close(pos[:, 1 + REGS :], grid)
    student = loaded.student.backbone.vit.state_dict()
    for name, value in loaded.teacher.backbone.vit.state_dict().items():
        torch.testing.assert_close(student[name], value)  # the student starts from it


def test_a_timm_state_dict_starts_both_backbones_with_fresh_heads(run, tmp_path):
    trained, _ = run
    state = trained.teacher.backbone.vit.state_dict()
    files = {"safetensors": tmp_path / "vit.safetensors", "torch": tmp_path / "vit.pth"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["safetensors"]))
    torch.save({"state_dict": state}, files["torch"])
    for file in files.values():
        torch.manual_seed(1)
        loaded = module(init_from=str(file))
        report = loaded.init_report
        assert report.kind == "timm"
        assert report.fresh == ["backbone.mask_token", "dino_head", "ibot_head"]
        for network in (loaded.student, loaded.teacher):
            for name, value in network.backbone.vit.state_dict().items():
                torch.testing.assert_close(value, state[name], msg=name)
        heads = zip(
            loaded.student.dino_head.parameters(),
            loaded.teacher.dino_head.parameters(),
            strict=True,
        )
        assert all(torch.equal(a, b) for a, b in heads)  # fresh, but the same in both
        assert not torch.equal(
            loaded.student.dino_head.last_layer.weight_v,
            trained.student.dino_head.last_layer.weight_v,
        )


def test_an_exported_encoder_starts_both_backbones(run, tmp_path):
    trained, ckpt = run
    folder = export_encoder(ckpt, tmp_path / "encoder")
    loaded = module(init_from=str(folder))
    images = torch.randn(2, 3, 28, 28)
    for network in (loaded.student, loaded.teacher):
        torch.testing.assert_close(
            features(network.backbone, images), features(trained.teacher.backbone, images)
        )


def test_a_pretrain_checkpoint_restores_student_teacher_and_heads(run):
    trained, ckpt = run
    loaded = module(init_from=str(ckpt))
    report = loaded.init_report
    assert report.kind == "pretrain" and report.fresh == [] and report.resampled is None
    for branch in ("student", "teacher"):
        want = getattr(trained, branch).state_dict()
        got = getattr(loaded, branch).state_dict()
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=f"{branch}.{name}")
    assert not torch.equal(  # the two networks differ after training: each its own
        trained.student.dino_head.mlp[0].weight, trained.teacher.dino_head.mlp[0].weight
    )


def test_heads_of_another_size_start_fresh_and_the_backbone_loads(run):
    trained, ckpt = run
    loaded = module(init_from=str(ckpt), prototypes=32)
    assert loaded.student.dino_head.last_layer.weight_v.shape[0] == 32
    torch.testing.assert_close(
        loaded.teacher.backbone.vit.blocks[1].attn.qkv.weight,
        trained.teacher.backbone.vit.blocks[1].attn.qkv.weight,
    )
    for a, b in zip(
        loaded.student.dino_head.parameters(), loaded.teacher.dino_head.parameters(), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"depth": 3}, "missing blocks.2."),
        ({"depth": 1}, "not in the model blocks.1."),
        ({"embed_dim": 32}, "of another shape"),
    ],
)
def test_a_backbone_that_does_not_fit_is_an_error_naming_the_file_and_keys(run, change, message):
    _, ckpt = run
    with pytest.raises(PipelineError, match=message) as error:
        module(init_from=str(ckpt), arch_kwargs={**MODEL["arch_kwargs"], **change})
    assert str(ckpt) in str(error.value) and "--model.arch" in str(error.value)


def test_registers_the_model_lacks_are_an_error(run):
    _, ckpt = run
    with pytest.raises(PipelineError, match="reg_token"):
        module(init_from=str(ckpt), reg_tokens=0)


def test_the_former_init_weights_still_loads_and_a_conflict_is_named(run, tmp_path):
    trained, ckpt = run
    folder = export_encoder(ckpt, tmp_path / "encoder")
    weights = folder / "model.safetensors"
    loaded = module(init_weights=str(weights))
    torch.testing.assert_close(
        loaded.student.backbone.vit.pos_embed, trained.teacher.backbone.vit.pos_embed
    )
    with pytest.raises(ConfigError, match="former name"):
        module(init_weights=str(weights), init_from=str(ckpt))
    with pytest.raises(PipelineError, match="not found"):
        module(init_from=str(tmp_path / "missing.pth"))


def test_a_resumed_run_does_not_read_init_from(tmp_path):
    cfg = ModelConfig(**{**MODEL, "init_from": str(tmp_path / "gone.pth")})
    resumed = DINOv2Module.from_configs(cfg, LossConfig(), OptimConfig(), 10, load_init=False)
    assert "load_init" not in resumed.hparams

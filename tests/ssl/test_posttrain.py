"""High-resolution post-training (Midnight, Karasikov et al., 2025): the 392-px preset
continues a 224-px run, gives its outputs at 224 px before training, starts its schedules
warm; and an encoder evaluated at another input size without training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from pipeline.config import load_config
from pipeline.encoders import load_encoder
from pipeline.errors import ConfigError
from pipeline.eval.evaluate import EvaluateConfig, selected_encoders
from pipeline.ssl.config import LossConfig, OptimConfig
from pipeline.ssl.export import export_encoder
from pipeline.ssl.module import DINOv2Module
from pipeline.ssl.pretrain import PretrainConfig
from tests.ssl.tiny_fit import TINY14, TINY_HEADS, StepLog, fit, tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/ssl/conftest.py

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"
POSTTRAIN = PRESETS / "posttrain-392.yaml"


def tiny(path: Path, **overrides) -> PretrainConfig:
    """A preset on a tiny ViT (2 blocks, 64 wide, small heads), as overridden on the
    command line."""
    cfg = load_config(PretrainConfig, path)
    tiny = {
        "model.arch_kwargs": {**cfg.model.arch_kwargs, **TINY14},
        **{f"model.{k}": v for k, v in TINY_HEADS.items()},
    }
    return load_config(PretrainConfig, path, **{**tiny, **overrides})


def preset(**overrides) -> PretrainConfig:
    """The post-training preset on a tiny ViT-g/14."""
    return tiny(POSTTRAIN, **overrides)


def build(cfg: PretrainConfig, data=None) -> DINOv2Module:
    return DINOv2Module.from_configs(
        cfg.model, cfg.loss, cfg.optim, cfg.trainer.max_steps, data=data
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run of vitg14.yaml (224 px, 16 x 16 grid): 2 steps."""
    out = tmp_path_factory.mktemp("run_224")
    torch.manual_seed(0)
    cfg = tiny(PRESETS / "vitg14.yaml")
    trained = DINOv2Module.from_configs(cfg.model, LossConfig(), OptimConfig(warmup_steps=2), 2)
    ckpt = fit(trained, tiny_data(), LossConfig(), out, steps=2)
    return trained, ckpt


def features(backbone, images: torch.Tensor) -> torch.Tensor:
    cls, patches = backbone.eval()(images)  # B x D, B x N x D
    return torch.cat([cls[:, None], patches], dim=1)


def test_the_preset_continues_a_vitg14_run_at_twice_the_pixel_density():
    post = load_config(PretrainConfig, POSTTRAIN)
    run = load_config(PretrainConfig, PRESETS / "vitg14.yaml")
    assert post.model == run.model  # the run's network, heads included; its grid stored
    assert post.model.arch_kwargs["img_size"] == 224
    assert (post.data.global_size, post.data.local_size) == (392, 168)
    assert post.data.global_size % 14 == 0 and post.data.local_size % 14 == 0
    assert post.loss == run.loss and post.optim.weight_decay_end == run.optim.weight_decay_end
    o = post.optim
    assert o.warm_start and o.freeze_last_layer_steps == 0 and o.momentum_teacher == 0.9995
    assert o.warmup_steps > 0  # the lr warm-up is kept


def test_a_392_model_from_a_224_checkpoint_gives_its_outputs_at_224(run, tmp_path):
    trained, ckpt = run
    encoder = export_encoder(ckpt, tmp_path / "encoder")
    for source, fresh_heads in ((ckpt, False), (encoder, True)):
        post = build(preset(**{"model.init_from": str(source)}))
        assert bool(post.init_report.fresh) == fresh_heads
        x224, x392 = torch.randn(2, 3, 224, 224), torch.randn(2, 3, 392, 392)
        for branch in ("student", "teacher"):
            new = getattr(post, branch).backbone
            old = (trained.teacher if fresh_heads else getattr(trained, branch)).backbone
            torch.testing.assert_close(features(new, x224), features(old, x224), atol=1e-5, rtol=0)
            assert torch.equal(new.vit.pos_embed[:, :1], old.vit.pos_embed[:, :1])  # class
            cls, patches = new(x392)  # B x D, B x 784 x D: the grid resampled per input
            assert patches.shape == (2, 28 * 28, 64) and torch.isfinite(patches).all()


def test_a_20_step_smoke_run_keeps_finite_losses_and_starts_warm(run, tmp_path):
    _, ckpt = run
    cfg = preset(
        **{
            "model.init_from": str(ckpt),
            "trainer.max_steps": 20,
            "optim.warmup_steps": 5,
        }
    )
    data = tiny_data(global_size=56, local_size=28)  # the preset's 392 / 168 px, shrunk
    module = build(cfg, data)
    log = StepLog()
    fit(module, data, cfg.loss, tmp_path, steps=20, callbacks=(log,))
    assert sorted(log.steps) == list(range(20)) and log.finite()
    first, second = log.steps[0], log.steps[1]
    # warm: the final values from step 0 (cold, they would be 0.04 and 0.04)
    assert first["schedule/teacher_temp"] == pytest.approx(cfg.loss.teacher_temp)
    assert first["schedule/wd"] == pytest.approx(cfg.optim.weight_decay_end)
    assert cfg.loss.teacher_temp != cfg.loss.teacher_temp_start
    assert cfg.optim.weight_decay_end != cfg.optim.weight_decay
    assert first["schedule/momentum"] == pytest.approx(0.9995)
    assert first["schedule/lr"] == 0.0 and second["schedule/lr"] > 0  # the lr warm-up kept
    last = [g for g in second["groups"] if g["last_layer"]]
    assert last and all(g["lr"] > 0 for g in last)  # no prototype freeze
    decayed = [g for g in first["groups"] if g["wd_mult"] == 1.0]
    assert all(g["weight_decay"] == pytest.approx(0.2) for g in decayed)


def test_a_cold_start_of_the_same_config_differs():
    cfg = preset(**{"optim.warm_start": False, "optim.freeze_last_layer_steps": 3})
    cold = build(cfg)
    assert cold.teacher_temp(0) == pytest.approx(cfg.loss.teacher_temp_start)
    assert cold.wd(0) == pytest.approx(cfg.optim.weight_decay)
    assert cold.freeze_last_layer_steps == 3
    warm = build(preset(**{"optim.freeze_last_layer_steps": 3}))
    assert warm.freeze_last_layer_steps == 0 and warm.teacher_temp(0) == cfg.loss.teacher_temp


def test_evaluation_at_another_input_size_resamples_the_grid_and_keeps_the_class(run, tmp_path):
    _, ckpt = run
    folder = export_encoder(ckpt, tmp_path / "encoder")
    base = load_encoder(folder)
    big = load_encoder(f"{folder}@392")
    assert (base.input_size, big.input_size) == (224, 392)
    assert big.name == f"{folder}@392" and big.config["native_input_size"] == 224
    old, new = base.model.pos_embed, big.model.pos_embed  # 1 x (1 + h*w) x D
    assert (old.shape[1], new.shape[1]) == (1 + 16 * 16, 1 + 28 * 28)
    assert torch.equal(new[:, :1], old[:, :1])  # the class position unchanged
    grid = resample_abs_pos_embed(old[:, 1:], [28, 28], [16, 16], num_prefix_tokens=0)
    torch.testing.assert_close(new[:, 1:], grid)  # bicubic, as timm
    tiles = torch.randint(0, 256, (2, 3, 512, 512), dtype=torch.uint8)
    with torch.inference_mode():
        assert big.normalize(tiles).shape[-2:] == (392, 392)
        assert torch.isfinite(big.embed(tiles)).all()
    suite = EvaluateConfig(encoders=f"base={folder},big={folder}@392")
    assert selected_encoders(suite)["big"] == f"{folder}@392"
    with pytest.raises(ConfigError, match="patch size 14"):
        load_encoder(f"{folder}@400")
    with pytest.raises(ConfigError, match="zoo encoder"):
        load_encoder("uni@392")

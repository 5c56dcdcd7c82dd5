"""The pretraining presets: DINOv2's recipe per size, built at random init (the large ones on
the meta device, where no memory is allocated)."""

from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.ssl.module import DINOv2Module
from pipeline.ssl.pretrain import PretrainConfig

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"
# preset: (patch, depth, width, drop path, prototypes, separate iBOT head, backbone params)
EXPECTED = {
    "vits16": (16, 12, 384, 0.1, 65536, False, 21.7e6),
    "vitb16": (16, 12, 768, 0.1, 65536, False, 85.8e6),
    "vitl16": (16, 24, 1024, 0.3, 65536, False, 303.3e6),
    "vitl14": (14, 24, 1024, 0.4, 131072, True, 303.2e6),
    "vitg14": (14, 40, 1536, 0.4, 131072, True, 1136.5e6),
}


def build(name: str, device: str) -> tuple[PretrainConfig, DINOv2Module]:
    cfg = load_config(PretrainConfig, PRESETS / f"{name}.yaml")
    with torch.device(device):
        module = DINOv2Module.from_configs(cfg.model, cfg.loss, cfg.optim, cfg.trainer.max_steps)
    return cfg, module


@pytest.mark.parametrize("name", [*EXPECTED, *(f"{k}_reg4" for k in EXPECTED if k != "vitl16")])
def test_preset_builds_student_and_teacher_at_the_dinov2_recipe(name):
    base = name.removesuffix("_reg4")
    patch, depth, width, drop, prototypes, separate, params = EXPECTED[base]
    cfg, module = build(name, "cpu" if base == "vits16" else "meta")
    for network in (module.student, module.teacher):
        vit = network.backbone.vit
        assert (network.backbone.patch_size, len(vit.blocks), vit.embed_dim) == (
            patch,
            depth,
            width,
        )
        assert vit.num_reg_tokens == (4 if name.endswith("_reg4") else 0)
        assert all(hasattr(b.ls1, "gamma") and hasattr(b.ls2, "gamma") for b in vit.blocks)
        assert (network.ibot_head is not None) == separate
        assert network.dino_head.last_layer.weight_v.shape[0] == prototypes
        backbone = sum(
            p.numel()
            for n, p in network.backbone.named_parameters()
            if not n.startswith("vit.reg_token")
        )
        assert backbone == pytest.approx(params, rel=0.01)
    assert cfg.model.layerscale == 1e-5 and cfg.data.global_size % patch == 0
    assert cfg.data.local_size == (98 if patch == 14 else 96)
    rates = [b.drop_path1.drop_prob for b in module.student.backbone.vit.blocks]
    assert rates == pytest.approx([drop] * depth)  # the same rate in every block
    assert module.student.dino_head.last_layer.weight_g.requires_grad
    if base == "vits16":  # real tensors: LayerScale starts at 1e-5
        gamma = module.student.backbone.vit.blocks[0].ls1.gamma
        assert torch.all(gamma == 1e-5)


@pytest.mark.parametrize("base", ["vits16", "vitb16", "vitl14", "vitg14"])
def test_register_presets_differ_from_their_base_only_in_registers(base):
    plain = yaml.safe_load((PRESETS / f"{base}.yaml").read_text())
    reg = yaml.safe_load((PRESETS / f"{base}_reg4.yaml").read_text())
    reg_model, plain_model = reg.pop("model"), plain.pop("model")
    assert reg.pop("out") == plain.pop("out") + "_reg4" and reg == plain
    if reg_model.pop("reg_tokens", None) != 4:  # or timm's DINOv2-with-registers architecture
        assert reg_model["arch"] == plain_model["arch"].replace("_dinov2", "_reg4_dinov2")
        reg_model["arch"] = plain_model["arch"]
    assert reg_model == plain_model


def test_midnight_preset_is_vitg14_with_the_midnight_data_and_kde():
    """Midnight (Karasikov et al., 2025): vitg14's model and optimiser, online patching at
    four mpps, the HSV filter, HED jitter on half the crops, KDE instead of KoLeo, 0.5/0.5."""
    raw = {n: yaml.safe_load((PRESETS / f"{n}.yaml").read_text()) for n in ("midnight", "vitg14")}
    assert raw["midnight"]["model"] == raw["vitg14"]["model"]
    assert raw["midnight"]["optim"] == raw["vitg14"]["optim"]
    cfg = load_config(PretrainConfig, PRESETS / "midnight.yaml")
    d, loss = cfg.data, cfg.loss
    assert (d.positions, d.mpps, d.min_tissue, d.tile_px) == ("random", [0.25, 0.5, 1, 2], 0.4, 256)
    assert d.hsv_filter and d.hsv_min_share == 0.6
    assert (d.hed_sigma, d.hed_bias, d.hed_probability) == (0.0, 0.05, 0.5)
    assert (d.hsv_hue, d.hsv_saturation, d.hsv_value) == (0.0, 0.0, 0.0)
    assert tuple(d.mean) == tuple(d.std) == (0.5, 0.5, 0.5)
    assert loss.koleo_weight == 0 and loss.kde_weight > 0


def test_midnight_data_section_feeds_batches_from_one_preprocess_run(tiny_prep):
    """The preset's data pipeline at small crops on the tiny demo run (0.5-mpp tiles):
    its four mpps drawn from one run's tissue, the finer ones where a slide serves them."""
    from dataclasses import replace

    from pipeline.ssl.config import LossConfig
    from pipeline.ssl.data import PretrainDataModule, PretrainTiles

    cfg = load_config(PretrainConfig, PRESETS / "midnight.yaml").data
    cfg = replace(
        cfg, coords=tiny_prep / "coords", batch_size=4, workers=0, global_size=56, local_size=28
    )
    data = PretrainDataModule(cfg, LossConfig(), patch_size=14, max_steps=1)
    data.dataset = PretrainTiles(cfg)
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader_for(1))), 0)
    assert batch["global"].shape == (8, 3, 56, 56) and torch.isfinite(batch["global"]).all()
    mpps = {data.dataset.patches.draw(i).mpp for i in range(60)}
    assert {0.5, 1.0, 2.0} <= mpps  # 0.25 only where level 0 is that fine


def test_exapath_preset_is_vitb16_on_tiles_normalised_before_the_augmentations(tiny_prep):
    """EXAPath (Yun et al., 2024): vitb16's model and trainer on Macenko-normalised tiles
    (the preset normalizer), with the slide-ID kNN monitor on."""
    from dataclasses import replace

    from pipeline.ssl.data import PretrainTiles
    from pipeline.stain import load_normalizer

    raw = {n: yaml.safe_load((PRESETS / f"{n}.yaml").read_text()) for n in ("exapath", "vitb16")}
    assert raw["exapath"]["model"] == raw["vitb16"]["model"]
    assert raw["exapath"]["trainer"] == raw["vitb16"]["trainer"]
    cfg = load_config(PretrainConfig, PRESETS / "exapath.yaml")
    assert str(cfg.data.stain_norm) == "exapath" and cfg.monitor.slide_knn_every_n_steps > 0
    data = replace(cfg.data, coords=tiny_prep / "coords", global_size=64, local_size=32)
    dataset = PretrainTiles(data)
    expected = load_normalizer("exapath")
    assert dataset.tiles.stain_norm.state_dict() == expected.state_dict()

    class Identity:  # the views are the tile itself: what the augmentations receive
        def __call__(self, tile):
            return [tile], []

    dataset.transform = Identity()
    views, _, attempt = dataset[0]
    tile = dataset.read(0, attempt)
    assert torch.equal(views[0], expected(tile)) and not torch.equal(views[0], tile)

"""The encoder zoo offline: architectures, output modes, weights layouts and transforms
(random init only, no network; FM_ZOO.md is the source of every expected number)."""

import json
import shutil
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms import v2

from pipeline.cli import main
from pipeline.encoders import ZOO, build_zoo_model, load_encoder, pool_tokens
from pipeline.encoders.build import zoo_encoder
from pipeline.encoders.zoo import specs
from pipeline.errors import ConfigError
from pipeline.extract import ExtractConfig
from pipeline.extraction import extract, plan
from pipeline.features import read_features
from pipeline.io import sha256_file

SPECS = specs()
BUILT = [s for s in SPECS if s.loader != "external"]  # conch-v1.5 needs its authors' code


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec", [s for s in SPECS if s.params_m], ids=lambda s: s.key)
def test_full_size_parameter_count_matches_fm_zoo(spec):
    model = build_zoo_model(spec.key, device="meta")
    assert n_params(model) == pytest.approx(spec.params_m * 1e6, rel=0.005)


@pytest.mark.parametrize("spec", BUILT, ids=lambda s: s.key)
def test_every_output_mode_gives_its_stated_dim(spec):
    x = torch.rand(2, 3, spec.input_size, spec.input_size)
    for mode, dim in spec.modes.items():
        torch.manual_seed(0)
        model = build_zoo_model(spec.key, mode=mode, depth=1)
        assert model.num_prefix_tokens == spec.num_prefix_tokens
        with torch.inference_mode():
            assert model(x).shape == (2, dim)


def test_aliases_and_keys_resolve_to_one_spec_each():
    assert ZOO["prov-gigapath"] is ZOO["gigapath"] and ZOO["uni2"].key == "uni2-h"
    assert len({s.key for s in SPECS}) == len(SPECS) >= 15


def test_patch_mean_skips_the_register_tokens():
    model = build_zoo_model("virchow2", mode="cls+mean", depth=1)
    assert model.num_prefix_tokens == 5  # CLS + 4 registers
    seen = {}

    def huge_registers(module, args, out):  # B x T x D after the final norm
        out = out.clone()
        out[:, 1:5] = 1e6
        seen["tokens"] = out
        return out

    model.backbone.norm.register_forward_hook(huge_registers)
    with torch.inference_mode():
        emb = model(torch.rand(2, 3, 224, 224))
    tokens = seen["tokens"]
    assert emb.shape == (2, 2560) and emb.abs().max() < 1e3
    torch.testing.assert_close(emb[:, :1280], tokens[:, 0])
    torch.testing.assert_close(emb[:, 1280:], tokens[:, 5:].mean(dim=1))


def test_pool_tokens_on_a_known_sequence():
    tokens = torch.arange(6.0).view(1, 6, 1).expand(1, 6, 2)  # CLS 0, registers 1-2, patches 3-5
    assert pool_tokens(tokens, 3, "cls").tolist() == [[0.0, 0.0]]
    assert pool_tokens(tokens, 3, "cls+mean").tolist() == [[0.0, 0.0, 4.0, 4.0]]
    assert pool_tokens(torch.ones(1, 4, 2, 2), 0, "mean").tolist() == [[1.0] * 4]


@pytest.fixture(scope="module")
def virchow2_file(tmp_path_factory):
    torch.manual_seed(1)
    model = build_zoo_model("virchow2", depth=2)
    path = tmp_path_factory.mktemp("w") / "virchow2.safetensors"
    save_file(model.backbone.state_dict(), str(path))
    return model, path


def test_timm_weights_round_trip_and_modes_by_name(virchow2_file):
    model, path = virchow2_file
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    default = load_encoder("virchow2", weights=path, depth=2)
    cls = load_encoder("virchow2:cls", weights=path, depth=2)
    assert (default.name, default.output_mode, default.key) == (
        "virchow2:cls+mean",
        "cls+mean",
        "virchow2",
    )
    with torch.inference_mode():
        x = default.normalize(images)
        assert torch.equal(default.model(x), model(x))
        assert default.embed(images).shape == (2, 2560) and default.output_dim() == 2560
        assert cls.embed(images).shape == (2, 1280) and cls.output_dim() == 1280
        torch.testing.assert_close(cls.embed(images), default.embed(images)[:, :1280])
    with pytest.raises(ConfigError, match="--pooling"):
        default.embed(images, "mean")


def test_dinov2_teacher_checkpoint_loads_like_timm(tmp_path):
    torch.manual_seed(2)
    model = build_zoo_model("gpfm", depth=2)
    teacher = {"mask_token": torch.zeros(1, 1024), "dino_head.last_layer.weight": torch.ones(3)}
    for name, value in model.backbone.state_dict().items():
        if name.startswith("blocks."):  # Meta's chunked blocks: chunk N holds block M
            block = int(name.split(".")[1])
            name = f"blocks.{block}.{name.removeprefix('blocks.')}"
        teacher[f"backbone.{name}"] = value
    path = tmp_path / "GPFM.pth"
    torch.save({"teacher": teacher, "student": {"unused": torch.ones(1)}}, path)
    encoder = load_encoder("gpfm", weights=path, depth=2)
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(encoder.model(x), model(x))


@pytest.fixture
def no_local_weights(tmp_path, monkeypatch):
    """No weights map and an empty Hugging Face cache."""
    monkeypatch.delenv("CPATH_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))


def test_no_weights_is_an_error_naming_the_hub_and_gating(no_local_weights):
    with pytest.raises(ConfigError) as err:
        load_encoder("virchow2")
    message = str(err.value)
    assert "paige-ai/Virchow2" in message and "gated" in message
    assert "--encoder-weights" in message and "Nothing is downloaded" in message
    assert "Hugging Face cache: no model.safetensors or pytorch_model.bin" in message
    assert "huggingface-cli download paige-ai/Virchow2" in message
    assert "download: not allowed ($CPATH_ALLOW_DOWNLOAD=1 allows it)" in message


def test_an_allowed_download_is_not_tried_offline(no_local_weights, monkeypatch):
    monkeypatch.setenv("CPATH_ALLOW_DOWNLOAD", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="download: not tried, HF_HUB_OFFLINE is set"):
        load_encoder("uni2-h")
    with pytest.raises(ConfigError, match="not gated"):
        load_encoder("kaiko-vits16")


def test_weights_from_a_map_named_by_the_environment(virchow2_file, tmp_path, monkeypatch):
    model, path = virchow2_file
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    (tmp_path / "weights").mkdir()
    shutil.copy(path, tmp_path / "weights" / "v2.safetensors")
    mapping = tmp_path / "weights.yaml"
    mapping.write_text("virchow2: weights/v2.safetensors\nuni-v1: /nowhere/uni.bin\n")
    monkeypatch.setenv("CPATH_WEIGHTS", str(mapping))
    encoder = load_encoder("virchow2:cls", depth=2)  # relative to the map's folder
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(encoder.model(x), build_like(model, "cls")(x))
    with pytest.raises(ConfigError, match="uni -> /nowhere/uni.bin, which does not exist"):
        load_encoder("uni", depth=1)  # an alias in the map names the key
    with pytest.raises(ConfigError, match="no 'gigapath' line"):
        load_encoder("gigapath", depth=1)
    mapping.write_text("not-a-model: x.bin\n")
    with pytest.raises(ConfigError, match="'not-a-model' is no zoo key"):
        load_encoder("virchow2", depth=2)


def test_weights_from_the_hugging_face_cache(virchow2_file, tmp_path, monkeypatch):
    """The cache's own layout: refs/main names the snapshot that holds the file."""
    model, path = virchow2_file
    monkeypatch.delenv("CPATH_WEIGHTS", raising=False)
    repo = tmp_path / "hub" / "models--paige-ai--Virchow2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    shutil.copy(path, repo / "snapshots" / "0123abcd" / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    encoder = load_encoder("virchow2", depth=2)
    assert encoder.weights_sha256 == sha256_file(path)
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(encoder.model(x), model(x))


def build_like(model, mode):
    """A copy of a shallow zoo model with another output mode, same weights."""
    other = build_zoo_model("virchow2", mode=mode, depth=2)
    other.backbone.load_state_dict(model.backbone.state_dict())
    return other.eval()


def test_evaluate_takes_a_zoo_key_as_an_encoder():
    from pipeline.eval.evaluate import EvaluateConfig, selected_encoders

    cfg = EvaluateConfig(encoder_specs={"mine": "runs/x/encoder"}, encoders="mine,uni2-h")
    assert selected_encoders(cfg) == {"mine": "runs/x/encoder", "uni2-h": "uni2-h"}


def test_unknown_mode_names_the_spec_modes(virchow2_file):
    with pytest.raises(ConfigError, match="cls\\+mean, cls"):
        load_encoder("virchow2:mean", weights=virchow2_file[1])
    with pytest.raises(ConfigError, match="cls"):
        load_encoder("uni:cls+mean", weights=virchow2_file[1])


@pytest.fixture(scope="module")
def carcinoma(sources):
    from PIL import Image

    rgb = np.array(Image.open(sources["carcinoma"]).convert("RGB"))
    return torch.from_numpy(rgb).permute(2, 0, 1)  # 3 x H x W uint8


@pytest.mark.parametrize("size", [256, 512])
def test_gigapath_transform_equals_torchvision(carcinoma, size):
    spec = ZOO["gigapath"]
    encoder = zoo_encoder(spec, "cls", nn.Identity())
    by_hand = v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(224),
            v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    tile = carcinoma[:, 100 : 100 + size, 200 : 200 + size]  # a real H&E tile
    ours = encoder.normalize(tile[None])[0]
    assert ours.shape == (3, 224, 224)
    expected = by_hand(tile)
    if size != 256:  # bicubic overshoots: we clamp to [0, 1] as a uint8 (PIL) resize would
        resized = by_hand.transforms[1](v2.ToDtype(torch.float32, scale=True)(tile))
        expected = v2.Normalize(spec.mean, spec.std)(v2.CenterCrop(224)(resized.clamp(0, 1)))
    # torchvision scales uint8 by * (1 / 255), we divide by 255: float rounding only
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_feature_files_record_the_zoo_key_mode_and_transform(tiny_prep, tmp_path):
    encoder = zoo_encoder(ZOO["virchow2"], "cls", nn.Identity())
    cfg = ExtractConfig(coords=tiny_prep / "coords", out=tmp_path, encoder="virchow2:cls")
    jobs, skipped = plan(cfg, encoder, "sha", tmp_path)
    assert jobs and not skipped
    attrs = jobs[0].attrs
    assert attrs["encoder"] == "virchow2:cls" and attrs["encoder_key"] == "virchow2"
    assert attrs["output_mode"] == "cls"
    assert attrs["transform"] == {
        "input_size": 224,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "resize_size": 224,
        "interpolation": "bicubic",
        "center_crop": False,
    }


def test_cpath_encoders_prints_the_zoo(capsys, virchow2_file, no_local_weights, tmp_path):
    mapping = tmp_path / "weights.yaml"
    mapping.write_text(f"virchow2: {virchow2_file[1]}\n")
    assert main(["encoders", "--weights_map", str(mapping)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = ["key", "aliases", "dim", "input", "mpp", "licence", "gated", "loader", "weights"]
    assert lines[0].split() == header
    virchow2 = next(line.split() for line in lines if line.startswith("virchow2 "))
    assert "2560" in virchow2 and virchow2[-3:] == ["yes", "timm", str(virchow2_file[1])]
    assert next(line for line in lines if line.startswith("uni ")).split()[-2:] == ["timm", "-"]
    assert main(["encoders", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows] == [s.key for s in SPECS]
    assert rows[[r["key"] for r in rows].index("virchow2")]["modes"] == {
        "cls+mean": 2560,
        "cls": 1280,
    }


def test_extract_with_a_zoo_encoder_writes_its_key_mode_and_dim(
    tiny_prep, tmp_path, no_local_weights
):
    """The weights come from the config's weights map."""
    torch.manual_seed(3)
    weights = tmp_path / "kaiko-vits16.safetensors"
    save_file(build_zoo_model("kaiko-vits16").backbone.state_dict(), str(weights))
    (tmp_path / "map.yaml").write_text("kaiko-vits16: kaiko-vits16.safetensors\n")
    coords = sorted((tiny_prep / "coords").glob("*.h5"))[0]
    cfg = ExtractConfig(
        coords=coords,
        out=tmp_path / "feats",
        encoder="kaiko-vits16",
        weights_map=tmp_path / "map.yaml",
        batch_size=64,
        workers=0,
        precision="fp32",
        dtype="float32",
        progress=False,
    )
    with pytest.raises(ConfigError, match="kaiko-vits16:MODE"):
        extract(replace(cfg, pooling="mean"))
    assert {r["status"] for r in extract(cfg)} == {"done"}
    feats, _, attrs = read_features(tmp_path / "feats" / coords.name)
    assert feats.shape[1] == 384 and attrs["embed_dim"] == 384
    assert (attrs["encoder"], attrs["encoder_key"], attrs["output_mode"]) == (
        "kaiko-vits16:cls",
        "kaiko-vits16",
        "cls",
    )
    assert attrs["transform"]["mean"] == [0.5, 0.5, 0.5] and attrs["transform"]["center_crop"]
    assert attrs["encoder_sha256"] == sha256_file(weights)


def test_virchow2_feature_files_say_their_mode_and_dim(
    tiny_prep, tmp_path, virchow2_file, monkeypatch
):
    """The issue's check: cls+mean (the default) gives 2560-d files, cls 1280-d, each
    saying so in its attributes (a two-block Virchow2: the giant one does not fit a test)."""
    import pipeline.extraction

    monkeypatch.setattr(pipeline.extraction, "load_encoder", partial(load_encoder, depth=2))
    coords = sorted((tiny_prep / "coords").glob("*.h5"))[0]
    cfg = ExtractConfig(
        coords=coords,
        encoder_weights=virchow2_file[1],
        workers=0,
        precision="fp32",
        dtype="float32",
        progress=False,
    )
    for name, mode, dim in (("virchow2", "cls+mean", 2560), ("virchow2:cls", "cls", 1280)):
        out = tmp_path / mode
        assert {r["status"] for r in extract(replace(cfg, encoder=name, out=out))} == {"done"}
        feats, _, attrs = read_features(out / coords.name)
        assert feats.shape[1] == dim and attrs["embed_dim"] == dim
        assert (attrs["encoder_key"], attrs["output_mode"]) == ("virchow2", mode)
        assert attrs["transform"]["interpolation"] == "bicubic"


def test_resnet50_trunc_takes_full_resnet_weights_and_pools_layer3(tmp_path):
    import timm

    torch.manual_seed(4)
    full = timm.create_model("resnet50", layers=[1] * 4).eval()  # with layer4 and fc
    path = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), path)
    encoder = load_encoder("resnet50-trunc", weights=path, depth=1)
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        stem = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        layer3 = full.layer3(full.layer2(full.layer1(stem)))  # B x 1024 x 14 x 14
        torch.testing.assert_close(encoder.model(x), layer3.mean(dim=(2, 3)))
    assert encoder.name == "resnet50-trunc:mean" and encoder.output_dim() == 1024


def test_a_spec_revision_picks_its_snapshot_in_the_cache(tmp_path, monkeypatch):
    from pipeline.encoders.weights import local_weights

    monkeypatch.delenv("CPATH_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--paige-ai--Virchow2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "model.safetensors").write_bytes(b"x")
    main_file, _ = local_weights(ZOO["virchow2"])
    pinned, _ = local_weights(replace(ZOO["virchow2"], revision="b" * 40))
    assert main_file.parent.name == "a" * 40 and pinned.parent.name == "b" * 40

"""Zoo models built by transformers, with the authors' own code, from a timm 0.5 Swin
checkpoint, or not at all (conch-v1.5): their published layouts load back with identical
outputs, offline, from files these tests write."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.cli import main
from pipeline.encoders import build_zoo_model, load_encoder
from pipeline.errors import ConfigError, PipelineError

transformers = pytest.importorskip("transformers")
IMAGES = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)


@pytest.fixture(scope="module")
def phikon_folder(tmp_path_factory):
    """A two-block Phikon saved as its authors publish it (``save_pretrained``)."""
    torch.manual_seed(3)
    model = build_zoo_model("phikon", depth=2)
    folder = tmp_path_factory.mktemp("phikon")
    model.backbone.save_pretrained(folder)
    return model, folder


def test_transformers_folder_loads_with_its_own_config(phikon_folder):
    model, folder = phikon_folder
    encoder = load_encoder("phikon", weights=folder)  # no depth: config.json gives 2 layers
    reference = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    with torch.inference_mode():
        x = encoder.normalize(IMAGES)
        expected = reference(pixel_values=x).last_hidden_state[:, 0]  # the card's embedding
        assert torch.equal(encoder.model(x), expected)
        assert torch.equal(encoder.model(x), model(x))
    assert encoder.embed_dim == 768 and encoder.name == "phikon:cls"
    assert encoder.weights_sha256 and len(encoder.weights_sha256) == 64


def test_transformers_weights_file_alone_takes_the_spec_config(phikon_folder, tmp_path):
    """A weights file without config.json, under a base-model prefix and with the pooler
    that Phikon's card drops: the spec's config builds the network, the pooler is left out."""
    model, folder = phikon_folder
    state = {f"vit.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    state["vit.pooler.dense.weight"] = torch.zeros(768, 768)
    save_file(state, str(tmp_path / "phikon.safetensors"))
    encoder = load_encoder("phikon", weights=tmp_path / "phikon.safetensors", depth=2)
    with torch.inference_mode():
        x = torch.rand(2, 3, 224, 224)
        assert torch.equal(encoder.model(x), model(x))
    with pytest.raises(PipelineError, match="do not match phikon"):
        load_encoder("phikon", weights=tmp_path / "phikon.safetensors", depth=3)


def test_a_folder_of_another_model_is_refused(tmp_path):
    build_zoo_model("midnight-12k", depth=1).backbone.save_pretrained(tmp_path / "dinov2")
    with pytest.raises(PipelineError, match="hidden size 1536, phikon-v2 has 1024"):
        load_encoder("phikon-v2", weights=tmp_path / "dinov2")  # same class, other width
    build_zoo_model("hibou-b", depth=1).backbone.save_pretrained(tmp_path / "registers")
    with pytest.raises(PipelineError, match="unexpected embeddings.register_tokens"):
        load_encoder("phikon-v2", weights=tmp_path / "registers")


def test_midnight_cls_mean_is_cls_and_patch_mean_of_the_last_hidden_state(tmp_path):
    """Midnight's authors' embedding: CLS and the mean of the patch tokens (3072)."""
    torch.manual_seed(4)
    build_zoo_model("midnight-12k", depth=1).backbone.save_pretrained(tmp_path)
    both = load_encoder("midnight-12k", weights=tmp_path)
    cls = load_encoder("midnight-12k:cls", weights=tmp_path)
    reference = transformers.Dinov2Model.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        x = both.normalize(IMAGES)
        tokens = reference(pixel_values=x).last_hidden_state  # B x (1 + 256) x 1536
        assert tokens.shape == (2, 257, 1536)
        expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
        torch.testing.assert_close(both.model(x), expected)
        torch.testing.assert_close(cls.model(x), tokens[:, 0])
    assert (both.embed_dim, cls.embed_dim) == (3072, 1536)
    assert both.mean == (0.5, 0.5, 0.5) and both.center_crop


REMOTE_CONFIG = """from transformers import Dinov2WithRegistersConfig


class TestHibouConfig(Dinov2WithRegistersConfig):
    model_type = "dinov2_with_registers"
"""
REMOTE_MODEL = """from transformers import Dinov2WithRegistersModel

from .configuration_test_hibou import TestHibouConfig


class TestHibouModel(Dinov2WithRegistersModel):
    config_class = TestHibouConfig
"""


def test_authors_code_runs_from_the_local_folder_only(tmp_path):
    """Hibou's folder carries its own modelling code (trust_remote_code): loaded from the
    user's copy, never fetched; its pooler output is the embedding."""
    torch.manual_seed(5)
    model = build_zoo_model("hibou-b", depth=2)
    folder = tmp_path / "hibou-b"
    model.backbone.save_pretrained(folder)
    # the weights under the names of the folder's own modules (its code subclasses today's)
    state = {k: v.contiguous() for k, v in model.backbone.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(  # the class names are the folder's own; the keys are DINOv2's
        architectures=["TestHibouModel"],
        auto_map={
            "AutoConfig": "configuration_test_hibou.TestHibouConfig",
            "AutoModel": "modeling_test_hibou.TestHibouModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match=r"authors' \*\.py files"):
        load_encoder("hibou-b", weights=folder)  # the code files are missing
    (folder / "configuration_test_hibou.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_test_hibou.py").write_text(REMOTE_MODEL)
    encoder = load_encoder("hibou-b", weights=folder)
    assert type(encoder.model.backbone).__name__ == "TestHibouModel"
    assert encoder.model.num_prefix_tokens == 5  # CLS + 4 registers
    with torch.inference_mode():
        x = encoder.normalize(IMAGES)
        out = model.backbone(pixel_values=x)
        assert torch.equal(encoder.model(x), out.pooler_output)
        assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    assert encoder.embed_dim == 768 and encoder.interpolation == "bicubic"


def timm05_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's timm Swin state dict in timm 0.5's layout: each stage ends with the
    downsample that today opens the next one; index and mask buffers are saved."""
    old = {}
    for name, value in state.items():
        parts = name.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        old[".".join(parts)] = value
        if name.endswith("attn.relative_position_bias_table"):
            old[name.replace("bias_table", "index")] = torch.zeros(49, 49, dtype=torch.long)
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    return old


def test_ctranspath_timm05_checkpoint_loads_and_mean_pools_the_swin_map(tmp_path):
    torch.manual_seed(6)
    model = build_zoo_model("ctranspath", depth=2)
    stem = {k for k in model.backbone.state_dict() if k.startswith("patch_embed.")}
    assert {k.rsplit(".", 1)[0] for k in stem} == {  # the published stem's names
        "patch_embed.proj.0",
        "patch_embed.proj.1",
        "patch_embed.proj.3",
        "patch_embed.proj.4",
        "patch_embed.proj.6",
        "patch_embed.norm",
    }
    old = timm05_layout(model.backbone.state_dict())
    assert "layers.0.downsample.reduction.weight" in old  # how timm tells the old layout
    assert not any(k.startswith("layers.3.downsample") for k in old)
    torch.save({"model": old}, tmp_path / "ctranspath.pth")
    encoder = load_encoder("ctranspath", weights=tmp_path / "ctranspath.pth", depth=2)
    with torch.inference_mode():  # the loaded copy pools the original's feature map
        x = torch.rand(1, 3, 224, 224)
        features = model.backbone.forward_features(x)  # B x 7 x 7 x 768 (NHWC, normed)
        assert features.shape == (1, 7, 7, 768)
        torch.testing.assert_close(encoder.model(x), features.mean(dim=(1, 2)))
    assert encoder.embed_dim == 768 and encoder.name == "ctranspath:mean"


def test_conch_v15_says_what_to_install(tmp_path, capsys):
    with pytest.raises(ConfigError, match="authors' code.*TRIDENT"):
        load_encoder("conch-v1.5", weights=tmp_path / "any.pth")
    with pytest.raises(ConfigError, match="MahmoodLab/conchv1_5"):
        build_zoo_model("conchv1_5")
    assert main(["encoders", "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["conch-v1.5"]["dim"] == "768 (pooler)"
    assert rows["conch-v1.5"]["loader"] == "external (needs the authors' code)"
    assert rows["hibou-b"]["loader"] == "transformers (the authors' code)"

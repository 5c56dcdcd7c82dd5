"""The encoder zoo: one declarative :class:`ModelSpec` per public pathology foundation model.

Every fact in a spec (timm architecture and kwargs, transform, output modes and dims,
recommended tile, licence, gating, parameter count) is taken from ``FM_ZOO.md`` (facts
gathered from TRIDENT, eva, STAMP and each model's own card or repository, checked offline
with timm 1.0.x); ``None`` marks what that source could not confirm. Adding a model is one
:func:`register` call. Three loaders build the networks: ``timm`` (most models),
``transformers`` (phikon, phikon-v2, midnight-12k, hibou: a ``transformers`` model class and
its config) and ``external`` (conch-v1.5, whose vision tower needs its authors' code: the
spec says what to install).

    uni:            ViT-L/16, CLS (1024)
    virchow2:cls    ViT-H/14 with 4 registers, CLS only (1280)
    virchow2        its authors' default, cls+mean: CLS + mean of the patch tokens (2560)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OUTPUT_MODES = ("cls", "cls+mean", "mean", "pooler")  # see pipeline.encoders.outputs
LOADERS = {  # loader -> (checkpoint layout, truncation) pairs it reads
    "timm": {("timm", None), ("dinov2-teacher", None), ("timm", "layer3"), ("swin-v1", None)},
    "transformers": {("transformers", None)},
    "external": {("external", None)},
}


@dataclass(frozen=True)
class ModelSpec:
    """A public foundation model: how to build it offline, feed it and read its output.

    Args:
        key: the name in ``--encoder`` (``KEY`` or ``KEY:MODE``) and in feature files.
        hub_id: where its weights are published, as FM_ZOO.md names it (``hf-hub:`` for the
            Hugging Face Hub); the user downloads them.
        revision: the Hub revision (commit or tag) whose weights the spec describes; None:
            the repo's main branch.
        arch: timm architecture; ``kwargs`` are passed to ``timm.create_model`` as given,
            with ``mlp_layer`` named by its class in ``timm.layers``, ``act_layer`` in
            ``torch.nn`` and ``embed_layer`` in :mod:`pipeline.encoders.layers`. For the
            ``transformers`` loader: the model class (``ViTModel``, ``Dinov2Model``, ...) and
            ``kwargs`` its config's.
        input_size: network input side (px).
        resize_size: shorter side (px) the tile is resized to, before a centre crop to
            ``input_size`` if ``center_crop``.
        modes: output mode -> embedding dim; ``default_mode`` is the authors' recommendation.
        num_prefix_tokens: tokens before the patch tokens (CLS + registers), skipped by the
            patch mean.
        mpp, tile_px: the tile the authors trained on or recommend (None: not confirmed).
        gated: whether the hub repo needs approved access (None: not confirmed).
        params_m: parameters (millions, without head) as FM_ZOO.md states, None if it does not.
        checkpoint: layout of the published weights: ``timm``, ``dinov2-teacher`` (Meta
            DINOv2 training checkpoint), ``swin-v1`` (a Swin of timm <= 0.5, CTransPath),
            ``transformers`` (a ``save_pretrained`` folder, or its weights file), see
            :mod:`pipeline.encoders.build`.
        truncate: ``layer3``: a ResNet cut after its third stage.
        loader: how the network is built: ``timm``, ``transformers`` or ``external`` (not
            built here: ``install`` says what the user needs).
        remote_code: the published folder holds the authors' own ``transformers`` code
            (``trust_remote_code``), run only from the user's local copy of the repo; the
            spec's ``arch`` is the stock class with the same architecture, for offline
            builds.
        install: for ``external`` models, what to install and how to load them instead.
    """

    key: str
    hub_id: str
    arch: str
    input_size: int
    resize_size: int
    modes: dict[str, int]
    default_mode: str
    num_prefix_tokens: int
    licence: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    interpolation: str = "bilinear"
    center_crop: bool = False
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    mpp: float | None = None
    tile_px: int | None = None
    gated: bool | None = None
    params_m: float | None = None
    checkpoint: str = "timm"
    truncate: str | None = None
    loader: str = "timm"
    revision: str | None = None
    remote_code: bool = False
    install: str | None = None

    def __post_init__(self) -> None:
        if self.default_mode not in self.modes or not set(self.modes) <= set(OUTPUT_MODES):
            raise ValueError(f"{self.key}: modes {self.modes}, default {self.default_mode}")
        if (self.checkpoint, self.truncate) not in LOADERS.get(self.loader, ()):
            raise ValueError(
                f"{self.key}: loader {self.loader}, checkpoint {self.checkpoint} and truncate "
                f"{self.truncate} are not supported ({LOADERS})"
            )
        if (self.loader == "external") != bool(self.install):
            raise ValueError(f"{self.key}: 'install' is for external models, and they need it")


ZOO: dict[str, ModelSpec] = {}  # key and every alias -> spec


def register(model: ModelSpec) -> ModelSpec:
    """Add ``model`` to :data:`ZOO` under its key and aliases (names must be new)."""
    for name in (model.key, *model.aliases):
        if name in ZOO:
            raise ValueError(f"zoo name '{name}' is taken by {ZOO[name].key}")
        ZOO[name] = model
    return model


def spec(name: str) -> ModelSpec | None:
    """The spec of a zoo key or alias (case-insensitive), None if there is none."""
    return ZOO.get(name.lower())


def specs() -> list[ModelSpec]:
    """Every spec once, in registration order."""
    return list({id(s): s for s in ZOO.values()}.values())


# MahmoodLab (FM_ZOO.md: UNI and UNI2-h model cards, TRIDENT)
register(
    ModelSpec(
        key="uni",
        aliases=("uni-v1",),
        hub_id="hf-hub:MahmoodLab/uni",
        arch="vit_large_patch16_224",
        kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        input_size=224,
        resize_size=224,
        center_crop=True,
        modes={"cls": 1024},
        default_mode="cls",
        num_prefix_tokens=1,
        mpp=0.5,
        tile_px=256,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        params_m=303.4,
    )
)
register(
    ModelSpec(
        key="uni2-h",
        aliases=("uni2",),
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        arch="vit_giant_patch14_224",
        kwargs={
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "embed_dim": 1536,
            "mlp_ratio": 5.33334,
            "init_values": 1e-5,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU",
            "reg_tokens": 8,
            "no_embed_class": True,
            "dynamic_img_size": True,
        },
        input_size=224,
        resize_size=224,
        center_crop=True,
        modes={"cls": 1536},
        default_mode="cls",
        num_prefix_tokens=9,
        mpp=0.5,
        tile_px=256,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        params_m=681.4,
    )
)

# Paige (FM_ZOO.md: Virchow and Virchow2 model cards; 2560 = CLS + patch mean is the
# authors' embedding, TRIDENT's too; eva and STAMP use CLS only)
_VIRCHOW = {
    "init_values": 1e-5,
    "mlp_ratio": 5.3375,
    "mlp_layer": "SwiGLUPacked",
    "act_layer": "SiLU",
    "global_pool": "",
    "dynamic_img_size": True,
}
register(
    ModelSpec(
        key="virchow",
        aliases=("virchow1",),
        hub_id="hf-hub:paige-ai/Virchow",
        arch="vit_huge_patch14_224",
        kwargs=_VIRCHOW,
        input_size=224,
        resize_size=224,
        interpolation="bicubic",
        modes={"cls+mean": 2560, "cls": 1280},
        default_mode="cls+mean",
        num_prefix_tokens=1,
        mpp=0.5,
        tile_px=224,
        licence="Apache-2.0 with gated terms of use",
        gated=True,
        params_m=631.2,
    )
)
register(
    ModelSpec(
        key="virchow2",
        hub_id="hf-hub:paige-ai/Virchow2",
        arch="vit_huge_patch14_224",
        kwargs={**_VIRCHOW, "reg_tokens": 4},
        input_size=224,
        resize_size=224,
        interpolation="bicubic",
        modes={"cls+mean": 2560, "cls": 1280},
        default_mode="cls+mean",
        num_prefix_tokens=5,
        tile_px=224,  # trained on mixed 5x-40x: no single mpp
        licence="CC-BY-NC-ND-4.0",
        gated=True,
    )
)

# Bioptimus (FM_ZOO.md: H-optimus model cards; the card feeds 224-px tiles unresized)
_HOPTIMUS = {"img_size": 224, "init_values": 1e-5, "global_pool": "token"}
_HOPTIMUS_NORM = {
    "mean": (0.707223, 0.578729, 0.703617),
    "std": (0.211883, 0.230117, 0.177517),
}
_H_OPTIMUS_0 = register(
    ModelSpec(
        key="h-optimus-0",
        aliases=("hoptimus0",),
        hub_id="hf-hub:bioptimus/H-optimus-0",
        arch="vit_giant_patch14_reg4_dinov2",
        kwargs=_HOPTIMUS,
        input_size=224,
        resize_size=224,
        **_HOPTIMUS_NORM,
        modes={"cls": 1536},
        default_mode="cls",
        num_prefix_tokens=5,
        mpp=0.5,
        tile_px=224,
        licence="Apache-2.0",
        params_m=1134.8,
    )
)
register(  # the same network as H-optimus-0, other weights
    replace(
        _H_OPTIMUS_0,
        key="h-optimus-1",
        aliases=("hoptimus1",),
        hub_id="hf-hub:bioptimus/H-optimus-1",
        mpp=None,
        licence="see the model card (gated, manual review)",
        gated=True,
        params_m=None,
    )
)

# H0-mini (FM_ZOO.md: its card builds it from timm's hub config with SwiGLUPacked and SiLU,
# 261 tokens of 768 at 224 px: CLS, 4 registers, 16 x 16 patches; the card's example ends
# with CLS + patch mean; the architecture below is the closest timm one, not confirmed)
register(
    ModelSpec(
        key="h0-mini",
        aliases=("h0mini",),
        hub_id="hf-hub:bioptimus/H0-mini",
        arch="vit_base_patch14_reg4_dinov2",
        kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU",
        },
        input_size=224,
        resize_size=224,
        **_HOPTIMUS_NORM,
        modes={"cls+mean": 1536, "cls": 768},
        default_mode="cls+mean",
        num_prefix_tokens=5,
        mpp=0.5,
        tile_px=224,
        licence="see the model card (gated, manual review)",
        gated=True,
    )
)

# Microsoft / Providence (FM_ZOO.md: Prov-GigaPath card)
register(
    ModelSpec(
        key="gigapath",
        aliases=("prov-gigapath",),
        hub_id="hf-hub:prov-gigapath/prov-gigapath",
        arch="vit_giant_patch14_dinov2",
        kwargs={
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "img_size": 224,
            "dynamic_img_size": True,
        },
        input_size=224,
        resize_size=256,
        interpolation="bicubic",
        center_crop=True,
        modes={"cls": 1536},
        default_mode="cls",
        num_prefix_tokens=1,
        mpp=0.5,
        tile_px=256,
        licence="see the model card (gated)",
        gated=True,
        params_m=1135.0,
    )
)

# kaiko.ai (FM_ZOO.md: towards_large_pathology_fms releases; mean = std = 0.5). The
# ViT-L/14 keeps timm's 518-px position grid, interpolated for 224-px input
# (dynamic_img_size, as eva's kaiko backbones are built).
for _key, _arch, _dim, _prefix, _kwargs in (
    ("kaiko-vits16", "vit_small_patch16_224", 384, 1, {}),
    ("kaiko-vits8", "vit_small_patch8_224", 384, 1, {}),
    ("kaiko-vitb16", "vit_base_patch16_224", 768, 1, {}),
    ("kaiko-vitb8", "vit_base_patch8_224", 768, 1, {}),
    ("kaiko-vitl14", "vit_large_patch14_reg4_dinov2", 1024, 5, {"dynamic_img_size": True}),
):
    register(
        ModelSpec(
            key=_key,
            hub_id="kaiko-ai/towards_large_pathology_fms (GitHub releases)",
            arch=_arch,
            kwargs=_kwargs,
            input_size=224,
            resize_size=224,
            center_crop=True,
            mean=HALF[0],
            std=HALF[1],
            modes={"cls": _dim},
            default_mode="cls",
            num_prefix_tokens=_prefix,
            licence="kaiko non-commercial",
            gated=False,
        )
    )

# Lunit (FM_ZOO.md: benchmark-ssl-pathology release, DINO ViT-S/8; the file name and its
# public GitHub release as eva loads it)
register(
    ModelSpec(
        key="lunit-vits8",
        aliases=("lunit-dino-vits8",),
        hub_id=(
            "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/"
            "pretrained-weights/dino_vit_small_patch8_ep200.torch"
        ),
        arch="vit_small_patch8_224",
        input_size=224,
        resize_size=224,
        center_crop=True,
        mean=(0.70322989, 0.53606487, 0.66096631),
        std=(0.21716536, 0.26081574, 0.20723464),
        modes={"cls": 384},
        default_mode="cls",
        num_prefix_tokens=1,
        licence="Lunit non-commercial",
        gated=False,
        params_m=21.7,
    )
)

# GPFM (FM_ZOO.md: birkhoffkiki/GPFM; trained on 512-px tiles at 40x resized to 224)
register(
    ModelSpec(
        key="gpfm",
        hub_id="birkhoffkiki/GPFM (GitHub release, GPFM.pth)",
        arch="vit_large_patch14_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5},
        input_size=224,
        resize_size=224,
        interpolation="bicubic",
        modes={"cls": 1024},
        default_mode="cls",
        num_prefix_tokens=1,
        mpp=0.25,
        tile_px=512,
        licence="CC-BY-NC-ND-4.0",
        checkpoint="dinov2-teacher",
    )
)

# The classic baseline (FM_ZOO.md: ImageNet ResNet-50 cut after layer3, average-pooled)
register(
    ModelSpec(
        key="resnet50-trunc",
        hub_id="timm/resnet50 or torchvision ResNet-50 ImageNet weights",
        arch="resnet50",
        input_size=224,
        resize_size=224,
        center_crop=True,
        modes={"mean": 1024},
        default_mode="mean",
        num_prefix_tokens=0,
        mpp=0.5,
        licence="public (ImageNet weights)",
        gated=False,
        truncate="layer3",
    )
)

# Owkin (FM_ZOO.md: Phikon is a transformers ViTModel without pooler, CLS of the last hidden
# state; Phikon-v2 a transformers DINOv2 ViT-L/16, whose exact config its published
# config.json gives: the one below is for offline builds)
register(
    ModelSpec(
        key="phikon",
        hub_id="owkin/phikon",
        loader="transformers",
        checkpoint="transformers",
        arch="ViTModel",
        kwargs={
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "image_size": 224,
            "patch_size": 16,
            "layer_norm_eps": 1e-12,
            "qkv_bias": True,
        },
        input_size=224,
        resize_size=224,
        modes={"cls": 768},
        default_mode="cls",
        num_prefix_tokens=1,
        mpp=0.5,
        tile_px=224,
        licence="Owkin non-commercial",
        gated=False,
        params_m=85.8,
    )
)
register(
    ModelSpec(
        key="phikon-v2",
        aliases=("phikonv2",),
        hub_id="owkin/phikon-v2",
        loader="transformers",
        checkpoint="transformers",
        arch="Dinov2Model",
        kwargs={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "mlp_ratio": 4,
            "image_size": 224,
            "patch_size": 16,
            "layerscale_value": 1e-5,
        },
        input_size=224,
        resize_size=224,
        center_crop=True,
        modes={"cls": 1024},
        default_mode="cls",
        num_prefix_tokens=1,
        mpp=0.5,
        licence="Owkin non-commercial",
        gated=False,
    )
)

# kaiko.ai Midnight (FM_ZOO.md: transformers Dinov2Model shaped as facebook/dinov2-giant,
# no registers; its authors' embedding is CLS + patch mean, 3072)
register(
    ModelSpec(
        key="midnight-12k",
        aliases=("midnight", "midnight12k"),
        hub_id="kaiko-ai/midnight",
        loader="transformers",
        checkpoint="transformers",
        arch="Dinov2Model",
        kwargs={
            "hidden_size": 1536,
            "num_hidden_layers": 40,
            "num_attention_heads": 24,
            "mlp_ratio": 4,
            "use_swiglu_ffn": True,
            "image_size": 518,
            "patch_size": 14,
            "layerscale_value": 1.0,
        },
        input_size=224,
        resize_size=224,
        center_crop=True,
        mean=HALF[0],
        std=HALF[1],
        modes={"cls+mean": 3072, "cls": 1536},
        default_mode="cls+mean",
        num_prefix_tokens=1,
        licence="MIT",
        gated=False,
        params_m=1136.0,  # FM_ZOO.md: about 1136 M
    )
)

# HistAI Hibou (FM_ZOO.md: the authors' transformers code, DINOv2 with 4 registers, pooler
# output; the published folder runs with trust_remote_code from the user's local copy, the
# stock Dinov2WithRegistersModel below has the same shape for offline builds)
_HIBOU_NORM = {"mean": (0.7068, 0.5755, 0.722), "std": (0.195, 0.2316, 0.1816)}
for _key, _hub, _width, _depth, _heads, _gated in (
    ("hibou-b", "histai/hibou-b", 768, 12, 12, False),
    ("hibou-l", "histai/hibou-L", 1024, 24, 16, True),
):
    register(
        ModelSpec(
            key=_key,
            hub_id=_hub,
            loader="transformers",
            checkpoint="transformers",
            remote_code=True,
            arch="Dinov2WithRegistersModel",
            kwargs={
                "hidden_size": _width,
                "num_hidden_layers": _depth,
                "num_attention_heads": _heads,
                "mlp_ratio": 4,
                "image_size": 224,
                "patch_size": 14,
                "num_register_tokens": 4,
                "layerscale_value": 1e-5,
            },
            input_size=224,
            resize_size=224,
            interpolation="bicubic",
            **_HIBOU_NORM,
            modes={"pooler": _width},
            default_mode="pooler",
            num_prefix_tokens=5,
            licence="Apache-2.0",
            gated=_gated,
        )
    )

# CTransPath (FM_ZOO.md: Swin-T with a convolutional stem, head removed, average-pooled;
# published as a timm 0.5 checkpoint {"model": ...})
register(
    ModelSpec(
        key="ctranspath",
        hub_id="Xiyue-Wang/TransPath (ctranspath.pth) or CHIEF (CHIEF_CTransPath.pth), GitHub",
        arch="swin_tiny_patch4_window7_224",
        kwargs={"embed_layer": "ConvStem"},
        checkpoint="swin-v1",
        input_size=224,
        resize_size=224,
        modes={"mean": 768},
        default_mode="mean",
        num_prefix_tokens=0,
        mpp=1.0,
        tile_px=224,
        licence="GPL-3.0 (TransPath) / AGPL-3.0 (CHIEF)",
        gated=False,
        params_m=27.5,
    )
)

# CONCH v1.5 (FM_ZOO.md: its own ViT-L/16 at 448 px with an attentional pooler, built by its
# authors' code; not rebuilt here)
register(
    ModelSpec(
        key="conch-v1.5",
        aliases=("conchv1_5", "conch-v1_5"),
        hub_id="MahmoodLab/conchv1_5",
        loader="external",
        checkpoint="external",
        arch="CONCH v1.5 vision tower (the authors' ViT-L/16 + attentional pooler)",
        install=(
            "conch-v1.5's vision tower (a ViT-L/16 at 448 px with an attentional pooler) is "
            "built by its authors' code, which this pipeline does not include. Request access "
            "to MahmoodLab/conchv1_5 and MahmoodLab/TITAN on the Hugging Face Hub, then "
            "extract with their code or TRIDENT (`--patch_encoder conch_v15`); feature files "
            "in the CLAM layout (features + coords datasets) go to `cpath train-mil` as they are"
        ),
        input_size=448,
        resize_size=448,
        center_crop=True,
        modes={"pooler": 768},
        default_mode="pooler",
        num_prefix_tokens=1,
        mpp=0.5,
        tile_px=512,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
    )
)

"""Configuration of ``cpath pretrain``: one dataclass per group, defaults of the DINOv2 recipe
(its ``ssl_default_config.yaml``, with Sinkhorn-Knopp teacher targets as in all of its
published training configs, and a ViT-S/16 with drop path 0.1).

Every value can be set in YAML (``configs/pretrain/*.yaml``) or on the command line as
``--group.key value`` (``--data.coords runs/prep/coords --trainer.devices 8``).
Step counts replace DINOv2's "epochs" of 1,250 iterations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class ModelConfig:
    """Backbone and heads; the defaults are DINOv2's (Oquab et al., 2024).

    Args:
        arch: any timm ViT (vit_small_patch16_224, vit_base_patch16_224, vit_large_patch16_224,
            vit_large_patch14_dinov2, vit_giant_patch14_dinov2, ...).
        arch_kwargs: extra timm arguments (img_size, depth, embed_dim, ...); they win over
            the fields below.
        layerscale: LayerScale initial value (Touvron et al., 2021), 1e-5 in DINOv2; None for
            none (timm's default).
        reg_tokens: register tokens (Darcet et al., 2024), 4 in the *_reg4 presets.
        drop_path_rate: stochastic depth of the student.
        drop_path_uniform: the same stochastic-depth rate in every block, as in DINOv2; false
            gives timm's linear ramp from 0 (about half the regularisation).
        prototypes: DINO head output size (65,536 in DINOv2; 131,072 for its ViT-L/g).
        head_hidden: hidden width of the head MLP.
        head_bottleneck: bottleneck width before the prototypes (256; 384 for DINOv2's ViT-L/g).
        head_layers: MLP layers of the head.
        prototype_scale: trainable: the per-prototype scale of the weight-normalised last
            layer is trained, as in DINOv2; fixed: held at 1 (DINO v1's norm_last_layer).
        separate_ibot_head: an own head for iBOT instead of sharing the DINO head.
        init_from: trained weights to start from (pipeline.ssl.init_from): a timm state
            dict (safetensors or torch) or an exported encoder folder (backbone; fresh heads),
            a `cpath pretrain` checkpoint (student, teacher, and their heads where the
            architecture matches), or a checkpoint of Meta's DINOv2 code (teacher and student
            dicts). A patch grid of another size is resampled bicubically; a backbone tensor
            missing from the file is an error. Not read when a run resumes (--ckpt_path).
        init_weights: the former name of init_from (same meaning); give one of the two.
    """

    arch: str = "vit_small_patch16_224"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    layerscale: float | None = 1.0e-5
    reg_tokens: int = 0
    drop_path_rate: float = 0.1
    drop_path_uniform: bool = True
    prototypes: int = 65536
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3
    prototype_scale: Literal["trainable", "fixed"] = "trainable"
    separate_ibot_head: bool = False
    init_from: Path | None = None
    init_weights: Path | None = None

    def init_source(self) -> Path | None:
        """The weights to start from: ``init_from`` (or its former name ``init_weights``)."""
        if self.init_from and self.init_weights and Path(self.init_from) != Path(self.init_weights):
            from pipeline.errors import ConfigError

            raise ConfigError(
                f"--model.init_from {self.init_from} and --model.init_weights "
                f"{self.init_weights}: init_weights is the former name of init_from; give one"
            )
        source = self.init_from or self.init_weights
        return Path(source) if source else None

    def timm_kwargs(self) -> dict[str, Any]:
        """The timm arguments of the backbone (without stochastic depth)."""
        kwargs: dict[str, Any] = {}
        if self.layerscale:
            kwargs["init_values"] = self.layerscale
        if self.reg_tokens:
            kwargs["reg_tokens"] = self.reg_tokens
        return {**kwargs, **self.arch_kwargs}


@dataclass
class DataConfig:
    """Tiles read online from slides by their coords files, and the multi-crop views.

    Args:
        coords: coords folder of `cpath preprocess` (or one .h5, or a text list of them).
        batch_size: images per device per step.
        workers: DataLoader worker processes per device.
        global_size: side of the 2 global crops (px).
        local_size: side of the local crops (px).
        local_crops: number of local crops (0 for none).
        global_scale: area share range of the tile a global crop covers.
        local_scale: area share range of a local crop.
        stain_augment: HED and HSV stain jitter on every crop.
        hed_sigma: HED jitter scale range (+-).
        hed_bias: HED jitter shift range (+-), relative to the tile's mean concentration
            of each stain (so glass stays white).
        hed_probability: share of crops that get the HED jitter (Midnight: 0.5).
        hsv_hue: hue rotation range (+- turns).
        hsv_saturation: saturation scale range (+-).
        hsv_value: brightness scale range (+-).
        blur: probability of a Gaussian blur per crop.
        solarize: probability of solarization of the second global crop (0: off).
        stain_norm: stain normalizer applied to every tile before the augmentations: a JSON
            file (`cpath stain --action fit`) or a preset (exapath: EXAPath's Macenko
            constants); the exported encoder records it and `cpath extract` applies it.
        max_background: tiles with a larger share of near-white pixels are skipped.
        max_tiles_per_slide: sample at most this many tiles of each slide (None: all).
        tiles_per_visit: tiles read from a slide each time the shuffled stream opens it
            (1: every tile from a random slide; more: fewer slide opens on large cohorts,
            fewer slides per batch).
        positions: grid: the tiles of the coords files; random: Midnight's online patching
            (Karasikov et al., 2025), tile positions drawn uniformly inside the tissue
            that `cpath preprocess` found (its tissue/*.geojson), at the mpps below.
        mpps: random positions: the resolutions tiles are drawn at, um/px (None: the
            coords files' target mpp); one preprocess run serves all of them.
        mpp_weights: random positions: relative weight of each of mpps (None: equal).
        tile_px: random positions: tile side in px at every mpp (None: the coords files'
            tile size).
        min_tissue: random positions: least tissue share of a drawn tile (Midnight: 0.4).
        slide_weights: random positions: uniform (every slide alike) or tissue (by
            tissue area).
        hsv_filter: keep only tiles with at least hsv_min_share of pixels inside Virchow's
            HSV tissue range (Vorontsov et al., 2024; Midnight uses it): H 90-180, S 8-255,
            V 103-255 on OpenCV's 8-bit scale; other tiles are replaced, and the share
            replaced is logged (data/rejected).
        hsv_min_share: least share of in-range pixels of a kept tile.
        weights: sampling weights of the tiles (`cpath curate`'s weights.h5): tiles are
            drawn with probability proportional to their weight, a slide visit by its
            tiles' total weight (grid positions only); tiles without a weight there are
            never drawn (their count is logged), a coords file absent from it is an error.
        mean: normalisation mean of the encoder input.
        std: normalisation std of the encoder input.
        seed: seed of the tile order and augmentations.
    """

    coords: Path | None = None
    batch_size: int = 64
    workers: int = 8
    global_size: int = 224
    local_size: int = 96
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    stain_augment: bool = True
    hed_sigma: float = 0.05
    hed_bias: float = 0.05
    hed_probability: float = 1.0
    hsv_hue: float = 0.02
    hsv_saturation: float = 0.1
    hsv_value: float = 0.1
    blur: float = 0.2
    solarize: float = 0.0
    stain_norm: Path | None = None
    max_background: float = 0.7
    max_tiles_per_slide: int | None = None
    tiles_per_visit: int = 4
    positions: Literal["grid", "random"] = "grid"
    mpps: list[float] | None = None
    mpp_weights: list[float] | None = None
    tile_px: int | None = None
    min_tissue: float = 0.4
    slide_weights: Literal["uniform", "tissue"] = "uniform"
    hsv_filter: bool = False
    hsv_min_share: float = 0.6
    weights: Path | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    seed: int = 0


@dataclass
class LossConfig:
    """Objectives, each switched on by a weight above 0.

    Args:
        dino_weight: DINO image-level loss.
        ibot_weight: iBOT masked-patch loss (averaged over all global crops, masked or not,
            as in DINOv2).
        koleo_weight: KoLeo uniformity term, per global crop (summed over the two), as in
            DINOv2.
        kde_weight: KDE uniformity term (Midnight), per global crop like KoLeo; usually
            instead of it.
        kde_concentration: von Mises-Fisher kernel concentration of the KDE term.
        teacher_targets: sinkhorn (DINOv2's ViT-L/g configs) or centering (DINO; the
            default of DINOv2's base config).
        center_momentum: EMA momentum of the centre (centering only).
        student_temp: student softmax temperature.
        teacher_temp: teacher temperature after warm-up.
        teacher_temp_start: teacher temperature at step 0 (teacher_temp with
            optim.warm_start).
        teacher_temp_warmup_steps: steps of linear teacher-temperature warm-up (the final
            value is reached at step teacher_temp_warmup_steps - 1, as in DINOv2; none with
            optim.warm_start).
        mask_probability: share of the global crops masked for iBOT.
        mask_ratio: range of the share of patches masked in a masked crop.
    """

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    kde_weight: float = 0.0
    kde_concentration: float = 4.0
    teacher_targets: Literal["sinkhorn", "centering"] = "sinkhorn"
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_start: float = 0.04
    teacher_temp_warmup_steps: int = 37500
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)


@dataclass
class OptimConfig:
    """AdamW with the DINOv2 schedules (all indexed by optimizer step).

    Args:
        base_lr: learning rate for a global batch of 1024; scaled by sqrt(batch / 1024).
        min_lr: final learning rate of the cosine.
        warmup_steps: linear lr warm-up steps (0 to the peak at step warmup_steps - 1, as
            DINOv2's linspace).
        weight_decay: weight decay at step 0 (weight_decay_end with warm_start).
        weight_decay_end: weight decay at the end (cosine ramp; 0.4 in DINOv2's default
            config, 0.2 in its ViT-L/g configs).
        momentum_teacher: teacher EMA momentum at step 0.
        momentum_teacher_end: teacher EMA momentum at the end (cosine towards 1).
        layer_decay: layer-wise lr decay (1: off).
        patch_embed_lr_mult: lr multiplier of the patch embedding.
        freeze_last_layer_steps: the prototype layers' lr is 0 for this many steps (their
            AdamW moments still update), as in DINOv2 (none with warm_start).
        clip_grad: gradient-norm clipping of the backbone, the DINO head and the iBOT head,
            each on its own, as in DINOv2 (0: off).
        betas: AdamW betas.
        warm_start: continue a trained model (--model.init_from) with the schedules where
            its run ended, as Midnight's high-resolution post-training (Karasikov et al.,
            2025): weight decay held at weight_decay_end, the teacher temperature at
            loss.teacher_temp from step 0 (no warm-up), no prototype freeze; the lr warm-up
            (warmup_steps) and the teacher momentum (momentum_teacher, set it high, e.g.
            0.9995) stay as configured.
    """

    base_lr: float = 0.004
    min_lr: float = 1.0e-6
    warmup_steps: int = 12500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    momentum_teacher_end: float = 1.0
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_steps: int = 1250
    clip_grad: float = 3.0
    betas: tuple[float, float] = (0.9, 0.999)
    warm_start: bool = False


@dataclass
class TrainerConfig:
    """Lightning Trainer settings (devices, nodes, strategy, precision, checkpoints, logs).

    Args:
        accelerator: auto, cpu, gpu/cuda.
        devices: devices per node (int) or "auto".
        num_nodes: nodes (SLURM or torchrun set the ranks).
        strategy: auto, ddp, ddp_spawn, fsdp.
        precision: bf16-mixed, 16-mixed, 32-true.
        max_steps: optimizer steps to train for.
        ckpt_every_n_steps: checkpoint interval (last.ckpt is replaced each time).
        keep_checkpoints: also keep a step-numbered checkpoint at every interval.
        log_every_n_steps: metric logging interval.
        logger: csv or tensorboard.
        progress_bar: show a progress bar.
    """

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "bf16-mixed"
    max_steps: int = 125000
    ckpt_every_n_steps: int = 1000
    keep_checkpoints: bool = False
    log_every_n_steps: int = 10
    logger: Literal["csv", "tensorboard"] = "csv"
    progress_bar: bool = True


@dataclass
class MonitorConfig:
    """Monitors of the teacher during training.

    Args:
        probe: CSV of labelled tiles (coords,index,label) for a kNN probe and the PathoROB
            robustness index across slides; None: off.
        probe_every_n_steps: probe interval.
        rankme_every_n_steps: RankMe (collapse detector) interval.
        slide_knn_every_n_steps: interval of the slide-ID kNN accuracy on pretraining tiles
            (WSI-specific feature collapse, EXAPath), logged as collapse/slide_knn_acc beside
            its chance level; 0: off.
        slide_knn_slides: slides sampled for it (fixed by data.seed).
        slide_knn_tiles: tissue tiles sampled per slide.
    """

    probe: Path | None = None
    probe_every_n_steps: int = 500
    rankme_every_n_steps: int = 10
    slide_knn_every_n_steps: int = 500
    slide_knn_slides: int = 32
    slide_knn_tiles: int = 16


@dataclass
class ExpertConfig:
    """One frozen expert encoder that the student distils from (GPFM, Ma et al., 2025).

    Args:
        name: short name of the expert, used for its head and in the logged metrics
            (letters, digits, - and _).
        encoder: any encoder `cpath extract` accepts: a zoo key (uni, phikon, ...), an
            exported encoder folder, or timm:<arch> with weights.
        weights: the expert's weights file (zoo keys and timm:; None: the weights map or
            the Hugging Face cache, as `cpath extract --encoder_weights`).
        cls_weight: weight of the class-token term, 1 - cosine (GPFM: UNI 1.0, Phikon 0.5,
            CONCH 1.0).
        patch_weight: weight of the patch-token term, 0.9 (1 - cosine) + 0.1 SmoothL1
            (GPFM: UNI 0.25, Phikon 0.125, CONCH 0: none).
    """

    name: str
    encoder: str
    weights: Path | None = None
    cls_weight: float = 1.0
    patch_weight: float = 0.0


@dataclass
class DistillConfig:
    """Distillation from frozen expert encoders alongside the DINOv2 objectives, as GPFM's
    unified knowledge distillation (Ma et al., Nat. Biomed. Eng. 2025): one head per expert
    maps the student's class and patch tokens of the global crops to the expert's.

    Args:
        experts: the experts, e.g. in YAML a list of {name, encoder, weights, cls_weight,
            patch_weight}, or on the command line --distill.experts
            '[{"name": "uni", "encoder": "uni", "cls_weight": 1.0, "patch_weight": 0.25}]'.
            Empty (the default): no distillation.
        head_bottleneck: width of each head's bottleneck (GPFM: 256).
        weights_map: YAML weights map of zoo experts (default $CPATH_WEIGHTS; see `cpath
            encoders`).
    """

    experts: list[ExpertConfig] = field(default_factory=list)
    head_bottleneck: int = 256
    weights_map: Path | None = None

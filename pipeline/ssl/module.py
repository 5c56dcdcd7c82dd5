"""The DINOv2 training step as a LightningModule: student, EMA teacher, losses, schedules.

Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024:
DINO image-level loss (Caron et al., 2021) on the class tokens of 2 global + N local
crops, iBOT masked-patch loss (Zhou et al., 2022) on the global crops, KoLeo (or the
KDE term of Midnight) on the student's global class tokens; the teacher is an EMA of
the student and sees the global crops only. With ``distill.experts``, the student also
distils from frozen expert encoders as GPFM does (:mod:`pipeline.ssl.distill`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import lightning as L
import torch
import torch.distributed as dist
from timm.models.vision_transformer import Block
from torch import nn

from pipeline.encoders import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import PipelineError
from pipeline.ssl.config import (
    DistillConfig,
    ExpertConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
)
from pipeline.ssl.distill import Expert, distill_heads, distill_losses, load_experts
from pipeline.ssl.init_from import InitReport, init_networks
from pipeline.ssl.losses import (
    TeacherTargets,
    dino_loss,
    entropy,
    ibot_loss,
    kde_loss,
    koleo_loss,
    rankme,
)
from pipeline.ssl.models import DINOHead, MaskedViT, SSLNetwork
from pipeline.ssl.schedules import Cosine, Linear, scaled_lr

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
CHECKPOINT_FORMAT = 2  # 2: weight-normalised prototypes with a trainable scale, DINOv2 groups


def build_network(model: ModelConfig, drop_path: bool) -> SSLNetwork:
    kwargs = model.timm_kwargs()
    if drop_path and model.drop_path_rate > 0:
        kwargs["drop_path_rate"] = model.drop_path_rate
        kwargs["drop_path_uniform"] = model.drop_path_uniform
    head = {
        "prototypes": model.prototypes,
        "hidden": model.head_hidden,
        "bottleneck": model.head_bottleneck,
        "layers": model.head_layers,
        "trainable_scale": model.prototype_scale == "trainable",
    }
    return SSLNetwork(model.arch, kwargs, head, model.separate_ibot_head)


def clean_name(name: str) -> str:
    """A parameter name without the prefixes of FSDP, activation checkpointing or compile."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, ``i + 1`` for block ``i``, ``depth + 1`` for the rest (norm, heads)."""
    if any(k in name for k in ("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token")):
        return 0
    if ".blocks." in name:
        return int(name.split(".blocks.")[1].split(".")[0]) + 1
    return depth + 1


def param_rule(name: str, ndim: int, depth: int, optim: OptimConfig) -> tuple[float, float, bool]:
    """``(lr multiplier, weight-decay multiplier, is last layer)`` of a student parameter by
    its name and original number of dimensions, as DINOv2's ``get_params_groups_with_decay``:
    layer-wise lr decay over the backbone's blocks (the heads and the final norm at 1), the
    patch embedding's lr times ``patch_embed_lr_mult``, no weight decay on biases, norms and
    LayerScale (``gamma``) (nor on any other 1-D tensor, which a DINOv2 ViT does not have),
    and the prototype layers flagged as last layers."""
    lid = layer_id(name, depth)
    lr_mult = optim.layer_decay ** (depth + 1 - lid)
    if "patch_embed" in name:
        lr_mult *= optim.patch_embed_lr_mult
    no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name or ndim == 1
    return lr_mult, 0.0 if no_decay else 1.0, "last_layer" in name


def fsdp_units() -> set[type[nn.Module]]:
    """The modules that FSDP shards as units of their own: each transformer block, each
    backbone and each head. Student and teacher thus have one unit per counterpart with the
    same parameter layout, so that each rank holds the same slice of both and the teacher's
    EMA pairs its local shards with the student's (see :meth:`DINOv2Module.update_teacher`).
    Nothing is left to the root unit, where the flattened student and teacher would be
    sliced at different offsets. The distillation heads are :class:`DINOHead` units of their
    own; the frozen experts are no submodules of the training module (a plain list, see
    :mod:`pipeline.ssl.distill`), so FSDP neither wraps nor shards them."""
    return {Block, MaskedViT, DINOHead}


def ibot_on(loss: LossConfig) -> bool:
    """Whether the iBOT loss can ever be computed (a weight and some masked images)."""
    return loss.ibot_weight > 0 and loss.mask_probability > 0


def freeze_unused(network: SSLNetwork, loss: LossConfig) -> None:
    """Freeze the parameters that the configured losses never use: the mask token and the
    iBOT head without iBOT, the DINO head when neither DINO nor a shared iBOT head uses it.

    Every trainable parameter then gets a gradient in every step, as DDP without
    ``find_unused_parameters`` requires (else multi-process runs fail after the first step).
    Frozen parameters stay in the state dict, so checkpoints keep their layout.
    """
    ibot = ibot_on(loss)
    if not ibot:
        network.backbone.mask_token.requires_grad_(False)
        if network.ibot_head is not None:
            network.ibot_head.requires_grad_(False)
    if loss.dino_weight <= 0 and not (ibot and network.ibot_head is None):
        network.dino_head.requires_grad_(False)


class DINOv2Module(L.LightningModule):
    """Student and teacher :class:`SSLNetwork`, trained by the DINOv2 objectives.

    ``global_batch`` (images per optimizer step over all devices) sets the lr by square-root
    scaling; it is taken from the trainer when training starts.
    """

    def __init__(
        self,
        model: dict,
        loss: dict,
        optim: dict,
        max_steps: int,
        rankme_every: int = 10,
        data: dict | None = None,
        load_init: bool = True,
        distill: dict | None = None,
    ):
        """``load_init=False``: do not read ``model.init_from`` (a resumed run, whose
        checkpoint replaces the weights anyway). ``distill``: a :class:`DistillConfig` as a
        dict (its experts are loaded here, on the CPU)."""
        super().__init__()
        self.save_hyperparameters(ignore=["load_init"])
        self.model_cfg, self.loss_cfg = ModelConfig(**model), LossConfig(**loss)
        self.optim_cfg, self.max_steps, self.rankme_every = (
            OptimConfig(**optim),
            max_steps,
            rankme_every,
        )
        self.student = build_network(self.model_cfg, drop_path=True)
        self.teacher = build_network(self.model_cfg, drop_path=False)
        source = self.model_cfg.init_source()
        self.init_report: InitReport | None = None  # what --model.init_from loaded
        if source is not None and load_init:
            self.init_report = init_networks(self.student, self.teacher, source)
        else:
            self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        freeze_unused(self.student, self.loss_cfg)
        depth = len(self.student.backbone.vit.blocks)
        self.distill_cfg = distill_config(distill)
        # frozen experts in a plain list: no module children, so neither in the state dict
        # nor the optimizer, nor wrapped by DDP or FSDP (moved to the device in on_fit_start)
        self.experts: list[Expert] = load_experts(self.distill_cfg)
        self.distill_heads = distill_heads(
            self.experts, self.student.backbone.embed_dim, self.distill_cfg.head_bottleneck
        )
        self.distill_ms: dict[str, float] = {}  # each expert's forward time in the last step
        # the normalisation of the crops, undone for the experts
        self.data_mean = tuple((data or {}).get("mean", IMAGENET_MEAN))
        self.data_std = tuple((data or {}).get("std", IMAGENET_STD))
        # decided here, on the unwrapped student: under FSDP the parameters that
        # configure_optimizers sees are flat 1-D shards under wrapped names
        self.param_rules = {
            name: param_rule(name, p.ndim, depth, self.optim_cfg)
            for name, p in self.trainable_named_parameters()
        }
        k = self.model_cfg.prototypes
        self.dino_targets = TeacherTargets(
            k, self.loss_cfg.teacher_targets, self.loss_cfg.center_momentum
        )
        self.ibot_targets = TeacherTargets(
            k, self.loss_cfg.teacher_targets, self.loss_cfg.center_momentum
        )
        self.samples_seen = 0
        self._last_time: float | None = None
        o, s = self.optim_cfg, self.loss_cfg
        # warm start (Midnight's post-training): weight decay and teacher temperature at
        # their final values from step 0, no prototype freeze; lr warm-up and momentum as set
        warm = o.warm_start
        self.wd = Cosine(
            o.weight_decay_end if warm else o.weight_decay, o.weight_decay_end, max_steps
        )
        self.momentum = Cosine(o.momentum_teacher, o.momentum_teacher_end, max_steps)
        self.teacher_temp = Linear(
            s.teacher_temp if warm else s.teacher_temp_start,
            s.teacher_temp,
            0 if warm else s.teacher_temp_warmup_steps,
        )
        self.freeze_last_layer_steps = 0 if warm else o.freeze_last_layer_steps

    def trainable_named_parameters(self):
        """The student's parameters, then the distillation heads' (``distill_heads.NAME.*``):
        everything the optimizer may update."""
        yield from self.student.named_parameters()
        yield from self.distill_heads.named_parameters(prefix="distill_heads")

    def on_fit_start(self) -> None:
        """The frozen experts to this module's device (bf16 on GPUs), in eval mode."""
        for expert in self.experts:
            expert.to(self.device)

    # -- optimisation -------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        dm = self.trainer.datamodule
        return int(dm.cfg.batch_size * self.trainer.world_size)

    def lr_schedule(self, global_batch: int) -> Cosine:
        o = self.optim_cfg
        peak = scaled_lr(o.base_lr, global_batch)
        return Cosine(peak, o.min_lr, self.max_steps, warmup=o.warmup_steps)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over groups of equal (lr multiplier, weight-decay multiplier, last layer), as
        :func:`param_rule` decides them; the same groups under DDP and FSDP."""
        groups: dict[tuple, dict] = {}
        for name, p in self.trainable_named_parameters():
            if not p.requires_grad:
                continue
            key = self.param_rules.get(clean_name(name))
            if key is None:
                raise PipelineError(f"no optimizer rule for the trainable parameter '{name}'")
            lr_mult, wd_mult, last = key
            group = groups.setdefault(
                key, {"params": [], "lr_mult": lr_mult, "wd_mult": wd_mult, "last_layer": last}
            )
            group["params"].append(p)
        return torch.optim.AdamW(list(groups.values()), lr=0.0, betas=tuple(self.optim_cfg.betas))

    def apply_schedules(
        self, optimizer: torch.optim.Optimizer, step: int, global_batch: int
    ) -> dict[str, float]:
        """Set each group's lr and weight decay for ``step``; the prototype layers' lr is 0
        for the first ``freeze_last_layer_steps`` steps (DINOv2's ``last_layer_lr``)."""
        lr, wd = self.lr_schedule(global_batch)(step), self.wd(step)
        frozen = step < self.freeze_last_layer_steps
        for group in optimizer.param_groups:
            group_lr = 0.0 if (frozen and group["last_layer"]) else lr
            group["lr"] = group_lr * group["lr_mult"]
            group["weight_decay"] = wd * group["wd_mult"]
        return {
            "lr": lr,
            "wd": wd,
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
        }

    def clip_parts(self) -> dict[str, list[torch.Tensor]]:
        """The trainable parameters of each part that DINOv2 clips on its own (the
        distillation heads are not clipped, as in GPFM, whose loop clips the student's parts
        only)."""
        parts = {"backbone": self.student.backbone, "dino_head": self.student.dino_head}
        if self.student.ibot_head is not None:
            parts["ibot_head"] = self.student.ibot_head
        return {k: [p for p in m.parameters() if p.requires_grad] for k, m in parts.items()}

    def clip_gradients_per_part(self) -> dict[str, torch.Tensor]:
        """Clip the gradient norm of the backbone, the DINO head and the iBOT head each to
        ``clip_grad``, as DINOv2 does; returns each part's norm before clipping.

        Under FSDP each rank holds a slice of every gradient: the squared norms of the slices
        are summed over the ranks, so each part is clipped by its full norm.
        """
        sharded = self.is_sharded()
        norms = {}
        for name, params in self.clip_parts().items():
            grads = [p.grad for p in params if p.grad is not None]
            device = grads[0].device if grads else self.device
            norm = (
                torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
            ).float()
            if sharded:
                squared = norm.square()
                dist.all_reduce(squared)
                norm = squared.sqrt()
            torch.nn.utils.clip_grads_with_norm_(params, self.optim_cfg.clip_grad, norm)
            norms[name] = norm
        return norms

    def is_sharded(self) -> bool:
        """Whether the student is wrapped by FSDP (its gradients are sharded over ranks)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        return any(isinstance(m, FullyShardedDataParallel) for m in self.student.modules())

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Lightning's clipping hook (after AMP unscaling): :meth:`clip_gradients_per_part`."""
        if self.optim_cfg.clip_grad and self.optim_cfg.clip_grad > 0:
            norms = self.clip_gradients_per_part()
            if self._trainer is not None:
                self.log_dict({f"grad_norm/{k}": v for k, v in norms.items()}, on_step=True)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the teacher's EMA update (before any checkpoint callback
        runs, so that a checkpoint holds a consistent student, teacher and sample count)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_teacher(self._momentum)
        self.samples_seen += self.global_batch

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_time is not None:
            rate = self.global_batch / max(now - self._last_time, 1e-9)
            self.log("images_per_s", rate, prog_bar=True, on_step=True, rank_zero_only=True)
        self._last_time = now

    # -- the step -----------------------------------------------------------------
    def ssl_losses(
        self, batch: dict, teacher_temp: float
    ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """The weighted loss terms of one batch, the teacher's DINO targets ``2B x K`` and
        class tokens ``2B x D``. With experts, also their distillation terms
        (``distill_cls/NAME``, ``distill_patch/NAME``; forward times in ``distill_ms``)."""
        s, student, teacher = self.loss_cfg, self.student, self.teacher
        images, local, masks = batch["global"], batch["local"], batch["masks"]  # 2B x 3 x G x G
        use_ibot = ibot_on(s) and bool(masks.any())
        with torch.no_grad():
            t_cls, t_patch = teacher.backbone(images)  # 2B x D, 2B x N x D
            t_targets = self.dino_targets(teacher.dino_head(t_cls), teacher_temp)  # 2B x K
            if use_ibot:
                t_patch_logits = teacher.patch_head()(t_patch[masks])  # M x K
                t_patch_targets = self.ibot_targets(t_patch_logits, teacher_temp)
        s_cls, s_patch = student.backbone(images, masks if use_ibot else None)
        views = list(student.dino_head(s_cls).chunk(2))  # 2 x (B x K)
        if local.numel():
            l_cls, _ = student.backbone(local)  # nB x D
            views += list(student.dino_head(l_cls).chunk(local.shape[0] // (images.shape[0] // 2)))
        terms = {}
        if s.dino_weight > 0:
            terms["dino"] = s.dino_weight * dino_loss(
                views, list(t_targets.chunk(2)), s.student_temp
            )
        if use_ibot:
            s_patch_logits = student.patch_head()(s_patch[masks])  # M x K
            terms["ibot"] = s.ibot_weight * ibot_loss(
                s_patch_logits, t_patch_targets, masks, s.student_temp
            )
        if s.koleo_weight > 0:  # per global crop, summed (DINOv2)
            terms["koleo"] = s.koleo_weight * sum(koleo_loss(c) for c in s_cls.chunk(2))
        if s.kde_weight > 0:  # weighted like KoLeo
            kde = sum(kde_loss(c, s.kde_concentration) for c in s_cls.chunk(2))
            terms["kde"] = s.kde_weight * kde
        if self.experts:
            side = images.shape[-1] // student.backbone.patch_size
            distill, self.distill_ms = distill_losses(
                self.experts,
                self.distill_heads,
                images,
                s_cls,
                s_patch,
                (side, side),
                self.data_mean,
                self.data_std,
            )
            terms.update(distill)
        return terms, t_targets, t_cls

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: ``teacher = m * teacher + (1 - m) * student``, all tensors in one fused call.

        Under FSDP the tensors are this rank's shards; they pair up only when student and
        teacher are sharded alike (:func:`fsdp_units`), which is checked here.
        """
        student = [p.detach() for p in self.student.parameters()]
        teacher = list(self.teacher.parameters())
        names = [n for n, _ in self.student.named_parameters()]
        bad = [
            f"{n}: {tuple(s.shape)} vs {tuple(t.shape)}"
            for n, s, t in zip(names, student, teacher, strict=False)
            if s.shape != t.shape
        ]
        if len(student) != len(teacher) or bad:
            raise PipelineError(
                f"teacher EMA: the student's and teacher's parameters on this rank do not pair "
                f"up ({len(student)} vs {len(teacher)} tensors; {'; '.join(bad[:3])}); under "
                "FSDP, student and teacher must be sharded alike (pipeline.ssl.module.fsdp_units)"
            )
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1 - momentum)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers().optimizer
        sched = self.apply_schedules(optimizer, self.global_step, self.global_batch)
        self._momentum = sched["momentum"]
        terms, t_targets, t_cls = self.ssl_losses(batch, sched["teacher_temp"])
        total = sum(terms.values())
        if not torch.isfinite(total):
            values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            raise PipelineError(
                f"non-finite loss at step {self.global_step} ({values}); lower "
                "--optim.base_lr or check the tiles"
            )
        logs = {f"loss/{k}": v.detach() for k, v in terms.items()}
        logs.update({f"schedule/{k}": v for k, v in sched.items()})
        logs["teacher_entropy"] = entropy(t_targets) / math.log(t_targets.shape[1])
        logs.update({f"distill/expert_ms/{k}": v for k, v in self.distill_ms.items()})
        self.log_dict(logs, on_step=True)
        self.log("loss", total.detach(), prog_bar=True, on_step=True)
        if self.rankme_every and self.global_step % self.rankme_every == 0:
            self.log("rankme", rankme(t_cls), on_step=True)
        return total

    # -- checkpoint state beyond parameters ---------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["samples_seen"] = self.samples_seen
        checkpoint["ssl_format"] = CHECKPOINT_FORMAT

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if int(checkpoint.get("ssl_format", 1)) < CHECKPOINT_FORMAT:
            raise PipelineError(
                "this checkpoint was written by an earlier `cpath pretrain` (fixed-norm "
                "prototypes, other optimizer groups) and cannot be resumed; `cpath pretrain "
                "export CKPT` still exports its encoder"
            )
        self.samples_seen = int(checkpoint.get("samples_seen", 0))

    @classmethod
    def from_configs(
        cls,
        model: ModelConfig,
        loss: LossConfig,
        optim: OptimConfig,
        max_steps: int,
        rankme_every: int = 10,
        data=None,
        load_init: bool = True,
        distill: DistillConfig | None = None,
    ) -> DINOv2Module:
        data = _plain(data) if data is not None else None
        distill = distill_dict(distill) if distill is not None and distill.experts else None
        return cls(
            _plain(model),
            _plain(loss),
            _plain(optim),
            max_steps,
            rankme_every,
            data,
            load_init,
            distill,
        )


def distill_config(distill: dict | None) -> DistillConfig:
    """A :class:`DistillConfig` from its dict (None: no experts)."""
    if not distill:
        return DistillConfig()
    experts = [ExpertConfig(**e) for e in distill.get("experts") or []]
    return DistillConfig(**{**distill, "experts": experts})


def distill_dict(distill: DistillConfig) -> dict:
    """``distill`` as plain values (paths as strings), as checkpoints keep hyperparameters."""
    out = asdict(distill)
    out["weights_map"] = str(out["weights_map"]) if out["weights_map"] else None
    out["experts"] = [
        {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in e.items()}
        for e in out["experts"]
    ]
    return out


def _plain(cfg) -> dict:
    out = asdict(cfg)
    return {
        k: (str(v) if hasattr(v, "__fspath__") else list(v) if isinstance(v, tuple) else v)
        for k, v in out.items()
    }

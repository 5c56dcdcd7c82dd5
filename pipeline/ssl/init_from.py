"""Start pretraining from trained weights: ``--model.init_from FILE``.

Four sources are read, each mapped onto the student and teacher :class:`SSLNetwork`:

- a timm state dict (safetensors or torch): the backbone of both networks, fresh heads;
- an encoder folder of ``cpath pretrain`` (``model.safetensors`` + ``config.json``,
  :mod:`pipeline.ssl.export`): the same;
- a ``cpath pretrain`` Lightning checkpoint: student and teacher as they were, with their
  heads and mask token where the architecture matches (fresh heads otherwise);
- a checkpoint in the layout of Meta's DINOv2 training code (Oquab et al., 2024):
  ``{"teacher": ..., "student": ...}`` dicts (or one flat dict of ``student.`` /
  ``teacher.`` keys, or a bare backbone), ``backbone.`` prefixes, chunked ``blocks.N.M``
  (FSDP block chunks), ``register_tokens`` without positions, ``mask_token`` and
  ``dino_head`` / ``ibot_head``; the backbone keys go through
  :func:`pipeline.encoders.build.dinov2_teacher_state`, as for the zoo.

Position embeddings are converted between timm's conventions (class and register
positions inside ``pos_embed`` or folded into the tokens, ``no_embed_class``) exactly, and a
patch grid of another size is resampled bicubically with timm's ``resample_abs_pos_embed``
(class and register positions unchanged). Anything of the backbone missing from the file,
of another shape or from deeper blocks is an error naming the file and the keys; heads and
the mask token without a match start fresh; what is left at init and what is dropped is
logged. This is how Midnight (Karasikov et al., 2025) continues a trained model in its
high-resolution post-training (``configs/pretrain/posttrain-392.yaml``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from pipeline.encoders.build import dinov2_teacher_state
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

Kind = Literal["timm", "encoder", "pretrain", "dinov2"]
VIT = "backbone.vit."
MASK_TOKEN = "backbone.mask_token"
HEADS = ("dino_head", "ibot_head")
WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
CLASSIFIER = ("head.", "fc_norm.", "head_drop.")
CHUNKED = re.compile(r"(^|\.)blocks\.\d+\.\d+\.")


@dataclass
class Source:
    """A weights file read into :class:`SSLNetwork` names (``backbone.vit.*``,
    ``backbone.mask_token``, ``dino_head.*``, ``ibot_head.*``) per network.

    ``unpositioned_registers``: the file's register tokens have no position embedding
    (DINOv2's layout), its ``pos_embed`` holds the class position and the patch grid.
    """

    path: Path
    kind: Kind
    student: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor] | None = None
    unpositioned_registers: bool = False


@dataclass
class InitReport:
    """What :func:`init_networks` did: the source kind, the patch grid resampled (``(old,
    new)`` or None), the tensors loaded per network, what was left fresh and what dropped."""

    path: Path
    kind: Kind
    resampled: tuple[tuple[int, int], tuple[int, int]] | None = None
    loaded: dict[str, int] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        grid = (
            f"; patch-grid position embeddings resampled {self.resampled[0]} -> {self.resampled[1]}"
            if self.resampled
            else ""
        )
        loaded = ", ".join(f"{k} {n} tensors" for k, n in self.loaded.items())
        return (
            f"init_from {self.path} ({self.kind}): {loaded}{grid}; left at init: "
            f"{_names(self.fresh) or 'nothing'}; dropped: {_names(self.dropped) or 'nothing'}"
        )


def _names(keys: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(keys) - limit})" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# -- reading -----------------------------------------------------------------------
def _load(path: Path, weights_only: bool) -> object:
    """``torch.load`` memory-mapped where the file allows it: each rank of a multi-GPU run
    reads the file, and only the tensors used are paged in (not the optimizer state)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _torch_load(path: Path) -> object:
    """A torch file, tensors only where possible (a Lightning checkpoint may hold more)."""
    try:
        return _load(path, weights_only=True)
    except pickle.UnpicklingError:
        log.warning(
            "%s holds Python objects besides tensors: read in full (trusted files only)", path
        )
    except Exception as exc:  # truncated or foreign files raise many types
        raise PipelineError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    try:
        return _load(path, weights_only=False)
    except Exception as exc:
        raise PipelineError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc


def _clean(name: str) -> str:
    for prefix in WRAPPERS:
        name = name.replace(prefix, "")
    return name.removeprefix("module.")  # DDP


def _tensors(state: dict, path: Path) -> dict[str, torch.Tensor]:
    out = {_clean(str(k)): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise PipelineError(f"{path}: holds no tensors to start from")
    return out


def _meta_branch(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One network of a DINOv2-layout checkpoint in :class:`SSLNetwork` names."""
    heads = {k: v for k, v in state.items() if k.startswith(HEADS)}
    backbone = {k: v for k, v in state.items() if not k.startswith(HEADS)}
    mask = backbone.get("backbone.mask_token", backbone.get("mask_token"))
    out = {}
    for name, value in dinov2_teacher_state(backbone).items():
        out[VIT + ("reg_token" if name == "register_tokens" else name)] = value
    if mask is not None:
        out[MASK_TOKEN] = mask.reshape(1, -1)  # 1 x D
    for name, value in heads.items():  # torch.nn.utils.parametrizations.weight_norm names
        name = name.replace("parametrizations.weight.original0", "weight_g")
        out[name.replace("parametrizations.weight.original1", "weight_v")] = value
    return out


def _is_meta(state: dict[str, torch.Tensor]) -> bool:
    names = list(state)
    return any(
        n.startswith(("backbone.", "dino_head.", "ibot_head."))
        or n in ("register_tokens", "mask_token")
        or CHUNKED.search(n)
        for n in names
    )


def read_source(path: str | os.PathLike) -> Source:
    """The weights of ``path`` as a :class:`Source` (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        weights, config = path / "model.safetensors", path / "config.json"
        if not (weights.is_file() and config.is_file()):
            raise PipelineError(
                f"{path}: a folder, but not an exported encoder (model.safetensors and "
                "config.json); give a weights file, an encoder folder or a checkpoint"
            )
        try:
            json.loads(config.read_text())["architecture"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise PipelineError(f"{path}: not an exported encoder (config.json: {exc})") from exc
        from safetensors.torch import load_file

        state = load_file(str(weights))
        return Source(path, "encoder", {VIT + k: v for k, v in state.items()})
    if not path.is_file():
        raise PipelineError(
            f"{path}: --model.init_from not found (a weights file, an encoder folder or a "
            "checkpoint)"
        )
    if ".safetensors" in path.name:
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path))
        except Exception as exc:
            raise PipelineError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    else:
        raw = _torch_load(path)
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: holds a {type(raw).__name__}, not a state dict")
    if isinstance(raw.get("state_dict"), dict) and any(
        str(k).startswith("student.backbone.vit.") for k in raw["state_dict"]
    ):
        state = _tensors(raw["state_dict"], path)
        student = {k[8:]: v for k, v in state.items() if k.startswith("student.")}
        teacher = {k[8:]: v for k, v in state.items() if k.startswith("teacher.")}
        return Source(path, "pretrain", student, teacher or None)
    for key in ("model", "state_dict"):  # DINOv2's checkpointer; other trainers
        if isinstance(raw.get(key), dict) and "teacher" not in raw:
            raw = raw[key]
            break
    if isinstance(raw.get("teacher"), dict) or isinstance(raw.get("student"), dict):
        branches = {k: _tensors(raw[k], path) for k in ("student", "teacher") if k in raw}
    elif any(str(k).startswith(("student.", "teacher.")) for k in raw):
        flat = _tensors(raw, path)
        branches = {
            b: {k[len(b) + 1 :]: v for k, v in flat.items() if k.startswith(f"{b}.")}
            for b in ("student", "teacher")
        }
        branches = {b: s for b, s in branches.items() if s}
    else:
        state = _tensors(raw, path)
        if not _is_meta(state):
            return Source(path, "timm", {VIT + k: v for k, v in state.items()})
        branches = {"teacher": state}
    if not any(_is_meta(s) for s in branches.values()):  # timm names per network
        mapped = {b: {VIT + k: v for k, v in s.items()} for b, s in branches.items()}
        student = mapped.get("student", mapped.get("teacher"))
        return Source(path, "timm", student, mapped.get("teacher"))
    mapped = {b: _meta_branch(s) for b, s in branches.items()}
    if "student" not in mapped:
        log.info("%s: no student in the file; the student starts from the teacher", path)
    student = mapped.get("student", mapped.get("teacher"))
    registers = any("register_tokens" in k for s in branches.values() for k in s)
    return Source(path, "dinov2", student, mapped.get("teacher"), registers)


# -- position embeddings ---------------------------------------------------------
def _square(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def fit_position_embedding(
    vit: nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    unpositioned_registers: bool = False,
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Rewrite ``state`` (timm names: ``pos_embed``, ``cls_token``, ``reg_token``) in place
    for the timm ViT ``vit``: the class and register positions moved between ``pos_embed``
    and the tokens as ``vit`` keeps them (exactly: a position added to a token either way),
    and the patch grid resampled bicubically to ``vit``'s grid. Returns ``(old grid, new
    grid)`` where it was resampled."""
    pos = state.get("pos_embed")
    if pos is None or getattr(vit, "pos_embed", None) is None:
        return None
    length, dim = pos.shape[1], pos.shape[-1]  # 1 x L x D
    regs = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    has_cls = "cls_token" in state
    if unpositioned_registers:
        candidates = [1 if has_cls else 0]  # DINOv2: the class position, then the grid
    else:
        same = 0 if getattr(vit, "no_embed_class", False) else int(has_cls) + regs
        candidates = [same, int(has_cls) + regs, int(has_cls), 0]
    prefix = next((p for p in candidates if _square(length - p)), None)
    if prefix is None:
        raise PipelineError(
            f"{path}: pos_embed of {length} positions is no square patch grid after "
            f"{sorted(set(candidates))} class/register positions; check --model.arch"
        )
    side = _square(length - prefix)
    cls_pos = pos[:, :1] if prefix >= 1 and has_cls else None  # 1 x 1 x D
    reg_pos = pos[:, 1:prefix] if prefix > 1 else None  # 1 x R x D
    grid = pos[:, prefix:]  # 1 x side^2 x D
    new = tuple(int(s) for s in vit.patch_embed.grid_size)
    resampled = None
    if (side, side) != new:
        grid = resample_abs_pos_embed(
            grid, new_size=list(new), old_size=[side, side], num_prefix_tokens=0
        )  # 1 x h*w x D, bicubic
        resampled = ((side, side), new)
    if getattr(vit, "no_embed_class", False) or not vit.num_prefix_tokens:
        if cls_pos is not None:  # folded into the token: cat(cls + p, ...) == cat(cls, ...) + p
            state["cls_token"] = state["cls_token"] + cls_pos
        if reg_pos is not None:
            state["reg_token"] = state["reg_token"] + reg_pos
        state["pos_embed"] = grid
        return resampled
    zeros = pos.new_zeros(1, 1, dim)
    parts = [cls_pos if cls_pos is not None else zeros] if vit.cls_token is not None else []
    want = int(getattr(vit, "num_reg_tokens", 0))
    if want:
        parts.append(
            reg_pos
            if reg_pos is not None and reg_pos.shape[1] == want
            else pos.new_zeros(1, want, dim)
        )  # DINOv2 registers have no position
    state["pos_embed"] = torch.cat([*parts, grid], dim=1)  # 1 x (prefix + h*w) x D
    return resampled


# -- loading -------------------------------------------------------------------------
def _part(name: str) -> str:
    return name.split(".")[0] if name.startswith(HEADS) else name


def load_network(
    network: nn.Module,
    state: dict[str, torch.Tensor],
    source: Source,
    role: str,
    report: InitReport,
) -> set[str]:
    """Load ``state`` (:class:`SSLNetwork` names) into ``network``: the whole backbone or an
    error, each head and the mask token where it matches. Returns the parts left fresh."""
    path = source.path
    vit_state = {k[len(VIT) :]: v for k, v in state.items() if k.startswith(VIT)}  # no copy
    resampled = fit_position_embedding(
        network.backbone.vit, vit_state, path, source.unpositioned_registers
    )
    report.resampled = report.resampled or resampled
    state = {
        **{VIT + k: v for k, v in vit_state.items()},
        **{k: v for k, v in state.items() if not k.startswith(VIT)},
    }
    target = network.state_dict()
    backbone = [k for k in target if k.startswith(VIT)]
    missing = [k for k in backbone if k not in state]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in backbone
        if k in state and state[k].shape != target[k].shape
    ]
    extra = [  # a classifier of the file's own is dropped; other backbone tensors are not
        k
        for k in state
        if k.startswith(VIT) and k not in target and not k[len(VIT) :].startswith(CLASSIFIER)
    ]
    if missing or wrong or extra:
        problems = []
        if missing:
            problems.append(f"missing {_names([k[len(VIT) :] for k in missing])}")
        if wrong:
            problems.append(f"of another shape {_names([k[len(VIT) :] for k in wrong])}")
        if extra:
            problems.append(f"not in the model {_names([k[len(VIT) :] for k in extra])}")
        raise PipelineError(
            f"{path}: its {role} backbone does not fit --model.arch "
            f"{network.backbone.arch} ({'; '.join(problems)}); set --model.arch, "
            "--model.arch_kwargs, --model.reg_tokens and --model.layerscale as in the run "
            "that wrote it"
        )
    chosen = {k: state[k] for k in backbone}
    fresh: set[str] = set()
    optional = [k for k in target if not k.startswith(VIT)]
    for part in sorted({_part(k) for k in optional}):
        keys = [k for k in optional if _part(k) == part]
        if all(k in state and state[k].shape == target[k].shape for k in keys):
            chosen.update({k: state[k] for k in keys})
        else:
            fresh.add(part)
    for k in state:
        if k not in target and _part(k) not in report.dropped:
            report.dropped.append(_part(k) if k.startswith(HEADS) else k)
    network.load_state_dict(chosen, strict=False)
    report.loaded[role] = len(chosen)
    return fresh


def init_networks(student: nn.Module, teacher: nn.Module, path: str | os.PathLike) -> InitReport:
    """Student and teacher :class:`SSLNetwork` from the weights at ``path`` (see the
    module docstring); parts left fresh are the same in both. Logs and returns the report."""
    source = read_source(path)
    report = InitReport(source.path, source.kind)
    fresh = load_network(student, source.student, source, "student", report)
    if source.teacher is None:
        teacher.load_state_dict(student.state_dict())
        report.loaded = {"student and teacher": report.loaded.pop("student")}
    else:
        fresh |= load_network(teacher, source.teacher, source, "teacher", report)
        for part in fresh:  # fresh in either: the same fresh weights in both
            names = part.split(".")
            s, t = student, teacher
            for n in names[:-1]:
                s, t = getattr(s, n), getattr(t, n)
            s, t = getattr(s, names[-1]), getattr(t, names[-1])
            if isinstance(s, nn.Module):
                t.load_state_dict(s.state_dict())
            elif isinstance(s, torch.Tensor):
                t.data.copy_(s.data)
    report.fresh = sorted(fresh)
    report.dropped = sorted(set(report.dropped))
    log.info(report.summary())
    return report

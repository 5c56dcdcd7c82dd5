"""The DINOv2 recipe, checked against values derived from the definitions of its official code
(``dinov2/train/ssl_meta_arch.py``, ``loss/``, ``utils/param_groups.py``, ``data/masking.py``,
``data/collate.py``, ``utils/utils.py``) on inputs where a plausible mistake shows: some images
masked and others not, parts with gradient norms on both sides of the clip, a ViT with
registers and LayerScale."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipeline.ssl.config import ModelConfig
from pipeline.ssl.losses import ibot_loss, kde_loss, sinkhorn_knopp
from pipeline.ssl.masking import batch_masks
from pipeline.ssl.module import build_network
from pipeline.ssl.schedules import Cosine, Linear, scaled_lr


def cross_entropy(targets: torch.Tensor, logits: torch.Tensor, temp: float) -> torch.Tensor:
    """Per row: ``-sum(t * log_softmax(s / temp))`` (DINOv2's ``lossfunc``, negated)."""
    return -(targets * F.log_softmax(logits.float() / temp, dim=-1)).sum(-1)


def ibot_reference(student, teacher, masks, temp):
    """DINOv2's ``forward_masked``: per masked patch, CE times ``1 / its image's masked count``,
    summed and divided by the number of global crops (``masks.shape[0]``)."""
    counts = masks.sum(-1).clamp(min=1.0)
    weights = (1 / counts).unsqueeze(-1).expand_as(masks)[masks]
    return (cross_entropy(teacher, student, temp) * weights).sum() / masks.shape[0]


def koleo_reference(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's ``KoLeoLoss``: nearest neighbour by inner product, ``-mean log(distance)``."""
    x = F.normalize(x.float(), eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    nearest = dots.argmax(dim=1)
    return -torch.log(torch.linalg.vector_norm(x - x[nearest] + eps, dim=-1) + eps).mean()


def some_masked(images: int, patches: int) -> torch.Tensor:
    """3 of ``images`` masked, with 1, 2 and 3 patches."""
    masks = torch.zeros(images, patches, dtype=torch.bool)
    masks[1, :2] = True
    masks[4 % images, 1:4] = True
    masks[6 % images, 3] = True
    return masks


def test_ibot_loss_averages_over_all_global_crops_not_the_masked_ones():
    g = torch.Generator().manual_seed(0)
    masks = some_masked(8, 6)  # 3 of 8 images masked: the old weighting gave 8 / 3 times more
    m = int(masks.sum())
    student = torch.randn(m, 5, generator=g)
    teacher = F.softmax(torch.randn(m, 5, generator=g), -1)
    expected = ibot_reference(student, teacher, masks, 0.1)
    # the same by hand: the mean CE of each masked image's patches, summed, over 8 images
    ce = cross_entropy(teacher, student, 0.1).split(masks.sum(1)[masks.any(1)].tolist())
    assert expected.item() == pytest.approx(sum(c.mean() for c in ce).item() / 8, rel=1e-6)
    assert ibot_loss(student, teacher, masks, 0.1).item() == pytest.approx(expected.item(), 1e-6)


def test_total_loss_is_weighted_as_in_dinov2(tiny_module):
    """DINO 1 (mean over the 2 + 2n student/teacher view pairs), iBOT 1 (over all global
    crops), KoLeo 0.1 on each global crop's class tokens, summed over the two crops."""
    torch.manual_seed(0)
    module = tiny_module(loss={"koleo_weight": 0.1})
    b, n_local, temp, teacher_temp = 4, 2, 0.1, 0.05
    masks = some_masked(2 * b, 4)
    batch = {
        "global": torch.randn(2 * b, 3, 16, 16),
        "local": torch.randn(n_local * b, 3, 8, 8),
        "masks": masks,
    }
    terms, _, _ = module.ssl_losses(batch, teacher_temp)
    student, teacher = module.student, module.teacher
    with torch.no_grad():
        t_cls, t_patch = teacher.backbone(batch["global"])
        t_dino = sinkhorn_knopp(teacher.dino_head(t_cls), teacher_temp)  # 2B x K
        t_ibot = sinkhorn_knopp(teacher.dino_head(t_patch[masks]), teacher_temp)  # M x K
        s_cls, s_patch = student.backbone(batch["global"], masks)
        l_cls, _ = student.backbone(batch["local"])
        s_out, l_out = student.dino_head(s_cls), student.dino_head(l_cls)
        pairs = (2 - 1) * 2 + n_local * 2
        swapped = torch.cat(t_dino.chunk(2)[::-1])  # crop A's student against crop B's teacher
        dino_global = cross_entropy(swapped, s_out, temp).mean() * 2 / pairs
        dino_local = (
            sum(
                cross_entropy(t, s, temp).mean()
                for s in l_out.chunk(n_local)
                for t in t_dino.chunk(2)
            )
            / pairs
        )
        ibot = ibot_reference(student.dino_head(s_patch[masks]), t_ibot, masks, temp)
        koleo = 0.1 * sum(koleo_reference(c) for c in s_cls.chunk(2))
    assert terms["dino"].item() == pytest.approx((dino_global + dino_local).item(), rel=1e-5)
    assert terms["ibot"].item() == pytest.approx(ibot.item(), rel=1e-5)
    assert terms["koleo"].item() == pytest.approx(koleo.item(), rel=1e-5)
    expected = dino_global + dino_local + ibot + koleo
    assert sum(terms.values()).item() == pytest.approx(expected.item(), rel=1e-5)


def mean_angle(x: torch.Tensor) -> float:
    x = F.normalize(x, dim=-1)
    cos = (x @ x.t()).clamp(-1, 1)
    off = ~torch.eye(len(x), dtype=torch.bool)
    return float(torch.arccos(cos[off]).mean())


def test_a_gradient_step_on_the_kde_term_spreads_the_embeddings():
    g = torch.Generator().manual_seed(4)
    x = (torch.ones(16, 8) + 0.3 * torch.randn(16, 8, generator=g)).requires_grad_(True)
    kde_loss(x, concentration=4.0).backward()
    spread = x.detach() - 0.5 * x.grad
    assert mean_angle(spread) > mean_angle(x.detach()) + 0.01


def test_gradients_are_clipped_per_part(tiny_module):
    """DINOv2 clips the backbone, the DINO head and the iBOT head each to 3.0: a part under
    the limit keeps its gradient, whatever the others' norms."""
    torch.manual_seed(0)
    module = tiny_module(model={"separate_ibot_head": True}, optim={"clip_grad": 3.0})
    wanted = {"backbone": 10.0, "dino_head": 1.0, "ibot_head": 5.0}
    parts = module.clip_parts()
    assert set(parts) == set(wanted)
    before = {}
    for name, norm in wanted.items():
        grads = [torch.randn_like(p) for p in parts[name]]
        total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
        for p, grad in zip(parts[name], grads, strict=True):
            p.grad = grad * norm / total
        before[name] = [p.grad.clone() for p in parts[name]]
    module.configure_gradient_clipping(optimizer=None)
    for name, norm in wanted.items():
        after = torch.cat([p.grad.flatten() for p in parts[name]])
        assert torch.linalg.vector_norm(after).item() == pytest.approx(min(norm, 3.0), rel=1e-4)
        scale = min(1.0, 3.0 / norm)
        for p, old in zip(parts[name], before[name], strict=True):
            assert torch.allclose(p.grad, old * scale, rtol=1e-4, atol=1e-7)  # same direction


def test_prototype_scale_is_trainable_and_starts_at_one(tiny_module):
    torch.manual_seed(0)
    module = tiny_module()
    layer = module.student.dino_head.last_layer
    assert layer.weight_g.shape == (16, 1) and layer.weight_g.requires_grad
    assert torch.equal(layer.weight_g.detach(), torch.ones(16, 1))
    head, x = module.student.dino_head, torch.randn(5, 16)
    with torch.no_grad():
        before = head(x)
        layer.weight_v.mul_(7.0)  # the direction alone counts ...
        assert torch.allclose(head(x), before, atol=1e-6)
        layer.weight_g[3] = 2.0  # ... and the scale multiplies its prototype's logits
        after = head(x)
        layer.weight_g[3] = 1.0
    assert torch.allclose(after[:, 3], 2 * before[:, 3], atol=1e-6)
    assert torch.allclose(after[:, :3], before[:, :3], atol=1e-6)
    masks = some_masked(4, 4)
    batch = {"global": torch.randn(4, 3, 16, 16), "local": torch.randn(4, 3, 8, 8), "masks": masks}
    terms, _, _ = module.ssl_losses(batch, 0.05)
    sum(terms.values()).backward()
    assert layer.weight_g.grad is not None and layer.weight_g.grad.abs().sum() > 0
    fixed = tiny_module(model={"prototype_scale": "fixed"})
    assert not fixed.student.dino_head.last_layer.weight_g.requires_grad
    assert fixed.state_dict().keys() == module.state_dict().keys()


def test_last_layer_lr_is_zero_while_frozen_and_its_adam_state_moves(tiny_module):
    torch.manual_seed(0)
    module = tiny_module(optim={"freeze_last_layer_steps": 3, "warmup_steps": 0})
    optimizer = module.configure_optimizers()
    last = [g for g in optimizer.param_groups if g["last_layer"]]
    names = {id(p): n for n, p in module.student.named_parameters()}
    assert sorted(names[id(p)] for g in last for p in g["params"]) == [
        "dino_head.last_layer.weight_g",
        "dino_head.last_layer.weight_v",
    ]
    sched = module.apply_schedules(optimizer, step=0, global_batch=1024)
    assert all(g["lr"] == 0.0 for g in last)
    assert all(
        g["lr"] == pytest.approx(sched["lr"] * g["lr_mult"])
        for g in optimizer.param_groups
        if not g["last_layer"]
    )
    params = [p for g in last for p in g["params"]]
    snapshot = [p.detach().clone() for p in params]
    batch = {
        "global": torch.randn(4, 3, 16, 16),
        "local": torch.randn(4, 3, 8, 8),
        "masks": some_masked(4, 4),
    }
    sum(module.ssl_losses(batch, 0.05)[0].values()).backward()
    optimizer.step()
    for p, old in zip(params, snapshot, strict=True):
        assert torch.equal(p.detach(), old)  # not moved, weight decay included
        assert optimizer.state[p]["exp_avg"].abs().sum() > 0  # its moments did
    sched = module.apply_schedules(optimizer, step=3, global_batch=1024)
    assert all(g["lr"] > 0 and g["lr"] == pytest.approx(sched["lr"] * g["lr_mult"]) for g in last)


def dinov2_rule(part: str, name: str, n_blocks: int, decay: float, patch_mult: float):
    """DINOv2's ``get_params_groups_with_decay`` for one parameter of a student part (it is
    called per part: the backbone with its ``n_blocks``, each head with none)."""
    backbone = part == "backbone"
    num_layers = n_blocks if backbone else 0
    layer = num_layers + 1
    embeddings = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
    if backbone:
        if any(k in name for k in embeddings):
            layer = 0
        elif "blocks." in name:
            layer = int(name[name.find("blocks.") :].split(".")[1]) + 1
    lr = decay ** (num_layers + 1 - layer)
    wd = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
    if "patch_embed" in name:
        lr *= patch_mult
    return lr, wd, "last_layer" in name


def dinov2_name(name: str) -> tuple[str, str]:
    """Our student parameter name as DINOv2's (part, name): timm's ``reg_token`` is DINOv2's
    ``register_tokens``; the mask token is the backbone's."""
    part, rest = name.split(".", 1)
    rest = rest.removeprefix("vit.")
    return part, "register_tokens" if rest == "reg_token" else rest


def test_parameter_groups_match_dinov2_for_a_vit_with_registers_and_layerscale(tiny_module):
    arch = {"img_size": 16, "patch_size": 8, "depth": 3, "embed_dim": 16, "num_heads": 2}
    module = tiny_module(
        model={
            "arch_kwargs": arch,
            "reg_tokens": 4,
            "layerscale": 1e-5,
            "separate_ibot_head": True,
        },
        optim={"layer_decay": 0.9, "patch_embed_lr_mult": 0.2},
    )
    vit = module.student.backbone.vit
    assert vit.num_reg_tokens == 4
    gammas = [p for n, p in vit.named_parameters() if n.endswith(".gamma")]
    assert len(gammas) == 6 and all(torch.all(g == 1e-5) for g in gammas)
    optimizer = module.configure_optimizers()
    found = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            found[id(p)] = (group["lr_mult"], group["wd_mult"], group["last_layer"])
    trainable = [(n, p) for n, p in module.student.named_parameters() if p.requires_grad]
    assert len(found) == len(trainable)
    for name, p in trainable:
        part, theirs = dinov2_name(name)
        lr, wd, last = dinov2_rule(part, theirs, 3, 0.9, 0.2)
        assert found[id(p)][0] == pytest.approx(lr), name
        assert found[id(p)][1:] == (wd, last), name
    rules = {n: found[id(p)] for n, p in trainable}  # spot checks of the rules above
    assert rules["backbone.vit.blocks.0.attn.qkv.weight"][:2] == pytest.approx((0.9**3, 1.0))
    assert rules["backbone.vit.patch_embed.proj.weight"][:2] == pytest.approx((0.2 * 0.9**4, 1))
    assert rules["backbone.vit.reg_token"][:2] == pytest.approx((0.9**4, 1.0))  # decayed
    assert rules["backbone.vit.blocks.2.ls1.gamma"][:2] == pytest.approx((0.9, 0.0))
    assert rules["ibot_head.last_layer.weight_g"] == (1.0, 1.0, True)


@pytest.mark.parametrize("uniform", [True, False])
def test_drop_path_is_uniform_over_blocks_unless_asked_otherwise(uniform):
    model = ModelConfig(
        arch="vit_tiny_patch16_224",
        drop_path_rate=0.3,
        drop_path_uniform=uniform,
        arch_kwargs={"img_size": 16, "patch_size": 8, "depth": 4, "embed_dim": 16, "num_heads": 2},
        prototypes=8,
        head_hidden=8,
        head_bottleneck=4,
        head_layers=2,
    )
    student, teacher = build_network(model, drop_path=True), build_network(model, drop_path=False)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in student.backbone.vit.blocks]
    expected = [0.3] * 4 if uniform else np.linspace(0, 0.3, 4).tolist()
    assert rates == pytest.approx(expected)
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in teacher.backbone.vit.blocks)


def dinov2_masks(
    batch: int, grid: int, probability: float, ratio: tuple[float, float], rng: random.Random
) -> list[np.ndarray]:
    """DINOv2's ``collate_data_and_cast`` with its ``MaskingGenerator(min_num_patches=4,
    min_aspect=0.3, max_num_patches=half the grid)``, written from their definitions."""
    n, cap = grid * grid, 0.5 * grid * grid
    log_aspect = (math.log(0.3), math.log(1 / 0.3))

    def grow(mask: np.ndarray, room: float) -> int:
        delta = 0
        for _ in range(10):
            area = rng.uniform(4, room)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
                if 0 < h * w - mask[top : top + h, left : left + w].sum() <= room:
                    delta += int(h * w - mask[top : top + h, left : left + w].sum())
                    mask[top : top + h, left : left + w] = True
                if delta > 0:
                    break
        return delta

    def generate(count: int) -> np.ndarray:
        mask, done = np.zeros((grid, grid), dtype=bool), 0
        while done < count:
            delta = grow(mask, min(count - done, cap))
            if delta == 0:
                break
            done += delta
        return mask

    masked = int(batch * probability)
    edges = np.linspace(*ratio, masked + 1)
    masks = [generate(int(n * rng.uniform(edges[i], edges[i + 1]))) for i in range(masked)]
    return masks + [np.zeros((grid, grid), bool)] * (batch - masked)


def mask_statistics(masks: list[np.ndarray]) -> dict[str, float]:
    blobs, singles, smallest, share = [], 0, [], []
    for mask in masks:
        if not mask.any():
            continue
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())[1:]
        blobs.append(count)
        singles += int((sizes == 1).sum())
        smallest.append(sizes.min())
        share.append(mask.mean())
    return {
        "blobs": float(np.mean(blobs)),
        "single_share": singles / sum(blobs),
        "smallest": float(np.mean(smallest)),
        "share": float(np.mean(share)),
        "masked": len(blobs),
    }


def test_block_masks_have_the_statistics_of_dinov2s():
    """Blob count, single-patch blobs, smallest blob and masked share over 3,200 masked crops
    of a 14 x 14 grid (224 px at patch 16), as DINOv2 draws them (the old masks: 2.69 blobs
    and 11.6% single-patch blobs, against 2.43 and 4.5%)."""
    rng, ref_rng = np.random.default_rng(0), random.Random(0)
    ours, theirs = [], []
    for _ in range(100):
        ours += list(batch_masks(64, (14, 14), 0.5, (0.1, 0.5), rng).reshape(64, 14, 14))
        theirs += dinov2_masks(64, 14, 0.5, (0.1, 0.5), ref_rng)
    a, b = mask_statistics(ours), mask_statistics(theirs)
    assert a["masked"] == b["masked"] == 3200
    assert a["blobs"] == pytest.approx(b["blobs"], abs=0.08)
    assert a["single_share"] == pytest.approx(b["single_share"], abs=0.015)
    assert a["smallest"] == pytest.approx(b["smallest"], rel=0.1)
    assert a["share"] == pytest.approx(b["share"], abs=0.006)


def test_masked_image_count_rounds_down_as_in_dinov2():
    rng = np.random.default_rng(0)
    assert batch_masks(6, (4, 4), 0.5, (0.1, 0.5), rng).any(1).sum() == 3
    assert batch_masks(3, (4, 4), 0.5, (0.1, 0.5), rng).any(1).sum() == 1  # int(1.5)
    assert batch_masks(2, (4, 4), 0.3, (0.1, 0.5), rng).sum() == 0  # int(0.6)


def dinov2_cosine(base, final, total, warmup=0, start_warmup=0.0) -> np.ndarray:
    """DINOv2's ``CosineScheduler`` as an array over its ``total`` steps."""
    warm = np.linspace(start_warmup, base, warmup)
    iters = np.arange(total - warmup)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warm, cosine))


def test_schedules_equal_dinov2s_step_by_step():
    lr, reference = Cosine(1.0, 0.1, total=110, warmup=10), dinov2_cosine(1.0, 0.1, 110, 10)
    assert [lr(i) for i in range(110)] == pytest.approx(reference.tolist())
    assert lr(9) == pytest.approx(1.0) and lr(110) == lr(500) == pytest.approx(0.1)
    temp = Linear(0.04, 0.07, 30)
    assert [temp(i) for i in range(30)] == pytest.approx(dinov2_cosine(0.07, 0.07, 30, 30, 0.04))
    assert temp(29) == pytest.approx(0.07) and temp(99) == 0.07
    assert Cosine(1.0, 0.0, total=10, warmup=1)(0) == 0.0  # linspace of one value
    assert scaled_lr(0.004, 256) == pytest.approx(0.002)  # sqrt_wrt_1024

"""Worker of ``test_fsdp.py``: one of 2 CPU processes (gloo) that wrap a tiny DINOv2Module in
FSDP as ``cpath pretrain --trainer.strategy fsdp`` does, train a step, update the teacher
and write what they found to ``OUT.RANK`` (JSON). It does so twice: with the units of
``fsdp_units`` ("units"), and with only the ViT blocks as units ("blocks", the layout
before the fix). Then ("optimizer") it builds the real AdamW groups under FSDP and checks
them, weight decay and three training steps against the unwrapped module and DDP.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python fsdp_ema.py OUT
"""

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from timm.models.vision_transformer import Block
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.ssl.config import LossConfig, ModelConfig, OptimConfig  # noqa: E402
from pipeline.ssl.module import DINOv2Module, clean_name, fsdp_units  # noqa: E402

TINY_VIT = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 16, "num_heads": 2}
MOMENTUM = 0.9


def full(root: FSDP, prefix: str) -> dict[str, torch.Tensor]:
    """The full (gathered) parameters of ``prefix`` (student or teacher), by name."""
    with FSDP.summon_full_params(root):
        return {
            clean_name(n.split(".", 1)[1]): p.detach().clone()
            for n, p in root.module.named_parameters()
            if n.startswith(prefix + ".")
        }


def tiny_model(**overrides) -> ModelConfig:
    """A ViT of 2 blocks, 16 wide, 16 px crops, with a 16-prototype head."""
    return ModelConfig(
        arch="vit_tiny_patch16_224",
        arch_kwargs=TINY_VIT,
        drop_path_rate=0.0,
        prototypes=16,
        head_hidden=16,
        head_bottleneck=8,
        head_layers=2,
        **overrides,
    )


def ema_step(units: str) -> dict:
    """Wrap, train a step, update the teacher; the EMA's error on the gathered parameters."""
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same module on both ranks
    model = tiny_model()
    module = DINOv2Module.from_configs(model, LossConfig(), OptimConfig(), max_steps=10)
    module.forward = lambda batch: sum(module.ssl_losses(batch, 0.04)[0].values())
    policy = {Block} if units == "blocks" else fsdp_units()
    root = FSDP(
        module,
        auto_wrap_policy=ModuleWrapPolicy(policy),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )
    torch.manual_seed(1 + rank)  # each rank its own batch
    masks = torch.zeros(4, 4, dtype=torch.bool)
    masks[0, :2] = True
    batch = {"global": torch.randn(4, 3, 16, 16), "local": torch.randn(4, 3, 8, 8), "masks": masks}
    root(batch).backward()
    torch.optim.SGD([p for p in root.parameters() if p.requires_grad], lr=0.5).step()
    student, teacher = full(root, "student"), full(root, "teacher")
    result = {}
    try:
        module.update_teacher(MOMENTUM)  # on this rank's shards
    except Exception as exc:  # reported to the test
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["trace"] = traceback.format_exc()
    else:
        after = full(root, "teacher")
        expected = {n: MOMENTUM * teacher[n] + (1 - MOMENTUM) * student[n] for n in teacher}
        result["max_error"] = max(
            float((after[n] - expected[n]).abs().max() / expected[n].abs().max().clamp_min(1))
            for n in after
        )
        result["params"] = len(after)
        result["trained"] = sum(not torch.equal(student[n], teacher[n]) for n in teacher)
    return result


def make_module(optim: OptimConfig) -> DINOv2Module:
    """The same tiny module (with LayerScale) on every rank."""
    torch.manual_seed(0)
    model = tiny_model(layerscale=1e-5, separate_ibot_head=True)
    module = DINOv2Module.from_configs(model, LossConfig(), optim, max_steps=10)
    module.forward = lambda batch: sum(module.ssl_losses(batch, 0.04)[0].values())
    return module


def wrap_fsdp(module: DINOv2Module) -> FSDP:
    return FSDP(
        module,
        auto_wrap_policy=ModuleWrapPolicy(fsdp_units()),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )


def group_table(module: DINOv2Module, optimizer: torch.optim.Optimizer) -> list:
    """Each AdamW group as ``[lr_mult, wd_mult, last_layer, sorted clean parameter names]``."""
    names = {id(p): clean_name(n) for n, p in module.student.named_parameters()}
    return sorted(
        [g["lr_mult"], g["wd_mult"], g["last_layer"], sorted(names[id(p)] for p in g["params"])]
        for g in optimizer.param_groups
    )


def weight_decay_and_training() -> dict:
    """AdamW groups under FSDP against the unwrapped module's (DDP's); one step on zero
    gradients, where AdamW only decays (``p * (1 - lr * wd)``); then 3 training steps with
    per-part clipping under FSDP and under DDP, compared on the gathered parameters."""
    rank = dist.get_rank()
    optim = OptimConfig(
        base_lr=0.1,
        warmup_steps=0,
        weight_decay=0.5,
        weight_decay_end=0.5,
        freeze_last_layer_steps=0,
        clip_grad=0.01,
    )
    plain = make_module(optim)
    plain_groups = group_table(plain, plain.configure_optimizers())
    module = make_module(optim)
    root = wrap_fsdp(module)
    optimizer = module.configure_optimizers()
    result = {
        "groups_equal": group_table(module, optimizer) == plain_groups,
        "groups": len(plain_groups),
        "decayed_groups": sum(g[1] > 0 for g in plain_groups),
    }
    before = full(root, "student")
    sched = module.apply_schedules(optimizer, 0, global_batch=1024)
    for p in module.student.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    after = full(root, "student")
    rules = plain.param_rules
    errors, shrunk = [], 0
    for name, p in plain.student.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult, wd_mult, _ = rules[name]
        expected = before[name] * (1 - sched["lr"] * lr_mult * sched["wd"] * wd_mult)
        errors.append(float((after[name] - expected).abs().max()))
        shrunk += bool(wd_mult > 0 and after[name].abs().sum() < before[name].abs().sum())
    result["decay_error"], result["shrunk"] = max(errors), shrunk

    def train(wrapped, module) -> list[float]:
        """Three steps; each step's per-part gradient norms."""
        optimizer, norms = module.configure_optimizers(), []
        torch.manual_seed(1 + rank)  # each rank its own batches
        for step in range(3):
            masks = torch.zeros(4, 4, dtype=torch.bool)
            masks[step % 4, :2] = True
            batch = {
                "global": torch.randn(4, 3, 16, 16),
                "local": torch.randn(4, 3, 8, 8),
                "masks": masks,
            }
            module.apply_schedules(optimizer, step, global_batch=1024)
            wrapped(batch).backward()
            norms += [float(v) for v in module.clip_gradients_per_part().values()]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return norms

    fsdp_module = make_module(optim)
    fsdp_root = wrap_fsdp(fsdp_module)
    fsdp_norms = train(fsdp_root, fsdp_module)
    ddp_module = make_module(optim)
    ddp_norms = train(DDP(ddp_module), ddp_module)
    result["norm_error"] = max(abs(a / b - 1) for a, b in zip(fsdp_norms, ddp_norms, strict=True))
    result["clipped"] = min(ddp_norms) > optim.clip_grad
    sharded = full(fsdp_root, "student")
    replicated = {n: p.detach() for n, p in ddp_module.student.named_parameters()}
    moved = make_module(optim).student.state_dict()
    result["fsdp_vs_ddp"] = max(float((sharded[n] - replicated[n]).abs().max()) for n in sharded)
    result["trained"] = sum(not torch.equal(replicated[n], moved[n]) for n in replicated)
    result["params"] = len(replicated)
    return result


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = {units: ema_step(units) for units in ("units", "blocks")}
    try:
        result["optimizer"] = weight_decay_and_training()
    except Exception as exc:  # reported to the test
        result["optimizer"] = {
            "error": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc(),
        }
    Path(f"{out}.{dist.get_rank()}").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

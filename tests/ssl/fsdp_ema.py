"""Worker of ``test_fsdp.py``: one of 2 CPU processes (gloo) that wrap a tiny DINOv2Module in
FSDP as ``cpath pretrain --trainer.strategy fsdp`` does, train a step, update the teacher
and write what they found to ``OUT.RANK`` (JSON). It does so twice: with the units of
``fsdp_units`` ("units"), and with only the ViT blocks as units ("blocks", the layout
before the fix).

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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.ssl.config import LossConfig, ModelConfig, OptimConfig  # noqa: E402
from pipeline.ssl.module import DINOv2Module, fsdp_units  # noqa: E402

TINY_VIT = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 16, "num_heads": 2}
MOMENTUM = 0.9


def full(root: FSDP, prefix: str) -> dict[str, torch.Tensor]:
    """The full (gathered) parameters of ``prefix`` (student or teacher), by name."""
    with FSDP.summon_full_params(root):
        return {n.split(".", 1)[1]: p.detach().clone() for n, p in root.module.named_parameters()
                if n.startswith(prefix + ".")}  # fmt: skip


def ema_step(units: str) -> dict:
    """Wrap, train a step, update the teacher; the EMA's error on the gathered parameters."""
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same module on both ranks
    model = ModelConfig(arch="vit_tiny_patch16_224", arch_kwargs=TINY_VIT, drop_path_rate=0.0,
                        prototypes=16, head_hidden=16, head_bottleneck=8, head_layers=2)  # fmt: skip
    module = DINOv2Module.from_configs(model, LossConfig(), OptimConfig(), max_steps=10)
    module.forward = lambda batch: sum(module.ssl_losses(batch, 0.04)[0].values())
    policy = {Block} if units == "blocks" else fsdp_units()
    root = FSDP(module, auto_wrap_policy=ModuleWrapPolicy(policy), use_orig_params=True,
                device_id=torch.device("cpu"))  # fmt: skip
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
        result["max_error"] = max(float((after[n] - expected[n]).abs().max()) for n in after)
        result["params"] = len(after)
        result["trained"] = sum(not torch.equal(student[n], teacher[n]) for n in teacher)
    return result


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = {units: ema_step(units) for units in ("units", "blocks")}
    Path(f"{out}.{dist.get_rank()}").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

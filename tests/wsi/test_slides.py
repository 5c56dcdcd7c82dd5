import os

import pytest

from pipeline.errors import ConfigError
from pipeline.wsi.preprocess import PreprocessConfig, preprocess
from pipeline.wsi.slides import SlideEntry, list_slides, parse_shard, shard_slides

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    """No SLURM or torchrun variables from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in LAUNCHER_VARS:
            monkeypatch.delenv(name)
    return monkeypatch


# What Slurm sets (src/common/env.c): the batch script gets the job's variables, among them
# SLURM_NTASKS and SLURM_PROCID=0; only `srun` steps get the SLURM_STEP_* variables.
BATCH = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_NODEID": "0"}
ARRAY = {
    **BATCH,
    "SLURM_NTASKS": "1",
    "SLURM_ARRAY_JOB_ID": "70",
    "SLURM_ARRAY_TASK_ID": "5",
    "SLURM_ARRAY_TASK_COUNT": "3",
    "SLURM_ARRAY_TASK_MIN": "4",
}


def _step(procid: int, ntasks: int) -> dict:
    return {
        "SLURM_PROCID": str(procid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": str(ntasks),
    }


def test_sbatch_script_with_several_tasks_is_not_a_shard(clean_env):
    for key, value in BATCH.items():  # `sbatch -n 8 --wrap "cpath preprocess ..."`
        clean_env.setenv(key, value)
    assert parse_shard(None) == (0, 1)
    for key, value in _step(5, 8).items():  # the same job's `srun` step, task 5 of 8
        clean_env.setenv(key, value)
    assert parse_shard(None) == (5, 8)


def test_array_tasks_and_ranks_combine(clean_env):
    for key, value in ARRAY.items():  # array task 1 of 3 (ids 4-6)
        clean_env.setenv(key, value)
    assert parse_shard(None) == (1, 3)
    clean_env.setenv("WORLD_SIZE", "8")  # torchrun --nproc_per_node 8 inside the array task
    seen = set()
    for rank in range(8):
        clean_env.setenv("RANK", str(rank))
        index, count = parse_shard(None)
        assert count == 24 and index == 8 + rank
        seen.add(index)
    assert len(seen) == 8
    clean_env.delenv("RANK")
    clean_env.delenv("WORLD_SIZE")
    for key, value in _step(2, 4).items():  # srun -n 4 inside the array task
        clean_env.setenv(key, value)
    assert parse_shard(None) == (6, 12)
    assert parse_shard("0/2") == (0, 2)  # --shard wins over the environment


def test_every_array_task_and_rank_gets_its_own_slides(clean_env):
    entries = [SlideEntry(f"s{i:02d}", f"s{i:02d}.svs") for i in range(50)]
    taken = []
    for task in range(3):
        for rank in range(4):
            env = {
                **ARRAY,
                "SLURM_ARRAY_TASK_ID": str(4 + task),
                "RANK": str(rank),
                "WORLD_SIZE": "4",
            }
            taken += [e.slide_id for e in shard_slides(entries, *parse_shard(None, env))]
    assert sorted(taken) == [e.slide_id for e in entries]


def test_sbatch_run_processes_every_slide(clean_env, tmp_path, cmu_svs):
    for key, value in BATCH.items():
        clean_env.setenv(key, value)
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a", "b"):
        os.symlink(cmu_svs.resolve(), slides / f"{name}.svs")
    out = tmp_path / "out"
    rows = preprocess(
        PreprocessConfig(slides=str(slides), out=out, tile_size=128, min_tissue=0.3), progress=False
    )
    assert sorted(r["slide_id"] for r in rows) == ["a", "b"]
    assert (out / "manifest.csv").exists()


def test_rerun_with_out_inside_the_slides_folder(tmp_path, cmu_svs):
    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(cmu_svs.resolve(), slides / "cmu.svs")
    cfg = PreprocessConfig(slides=str(slides), out=slides / "prep", tile_size=128, min_tissue=0.3)
    assert [r["status"] for r in preprocess(cfg, progress=False)] == ["ok"]
    assert (slides / "prep" / "thumbnails" / "cmu.jpg").exists()
    assert [r["status"] for r in preprocess(cfg, progress=False)] == ["skipped"]
    with pytest.raises(ConfigError, match="no slides found"):  # globs skip the output too
        list_slides(f"{slides}/**/*.png", exclude=slides / "prep")


def test_folder_scan_groups_dicom_and_skips_label_images(tmp_path):
    (tmp_path / "caseA").mkdir()
    for i in range(3):  # one DICOM WSI: a folder of instances (levels, label, overview)
        (tmp_path / "caseA" / f"1.2.826.0.{i}.dcm").write_bytes(b"DICM")
    (tmp_path / "caseB" / "sub").mkdir(parents=True)
    (tmp_path / "caseB" / "sub" / "img.dcm").write_bytes(b"DICM")
    for name in ("s1.svs", "label.jpg", "macro.jpg", "s1_macro.jpg", "s1-label.png", "he.png"):
        (tmp_path / name).write_bytes(b"x")
    entries = {e.slide_id: e.path for e in list_slides(tmp_path)}
    assert sorted(entries) == ["caseA", "he", "s1", "sub"]
    assert entries["caseA"].parent == tmp_path / "caseA" and entries["caseA"].suffix == ".dcm"
    # one DICOM file or its folder named directly is the same slide
    assert [e.slide_id for e in list_slides(tmp_path / "caseA" / "1.2.826.0.1.dcm")] == ["caseA"]
    assert [e.slide_id for e in list_slides(tmp_path / "caseA")] == ["caseA"]

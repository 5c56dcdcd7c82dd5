"""Feature extraction on the tiny demo cohort with a small exported encoder."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.encoders import load_encoder
from pipeline.extract import ExtractConfig
from pipeline.extraction import extract
from pipeline.features import is_complete, read_features
from pipeline.wsi.coords import read_coords, write_coords
from pipeline.wsi.reader import Slide
from tests.tiny_encoder import save_tiny_encoder


@pytest.fixture(scope="module")
def carcinoma_tile(sources):
    from PIL import Image

    rgb = np.asarray(Image.open(sources["carcinoma"]).convert("RGB"))[:256, :256]
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("enc") / "encoder")


def config(coords, out, encoder, **kw):
    base = {
        "coords": coords,
        "out": out,
        "encoder": str(encoder),
        "batch_size": 32,
        "workers": 1,
        "precision": "fp32",
        "dtype": "float32",
        "progress": False,
    }
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_prep, encoder_dir):
    out = tmp_path_factory.mktemp("feats")
    rows = extract(config(tiny_prep / "coords", out, encoder_dir))
    return {"out": out, "rows": rows}


def test_every_slide_has_features_aligned_with_its_coords(extracted, tiny_prep, encoder_dir):
    assert {r["status"] for r in extracted["rows"]} == {"done"}
    encoder = load_encoder(encoder_dir)
    for coords_file in sorted((tiny_prep / "coords").glob("*.h5")):
        table = read_coords(coords_file)
        feats, coords, attrs = read_features(extracted["out"] / coords_file.name)
        assert feats.shape == (len(table), 48) and np.array_equal(coords, table.coords)
        assert attrs["encoder_sha256"] == encoder.weights_sha256 and attrs["complete"]
        assert attrs["target_mpp"] == 0.5 and attrs["patch_size"] == 128
        with h5py.File(extracted["out"] / coords_file.name) as f:  # CLAM-style datasets
            assert set(f) == {"features", "coords"}
    # a tile's feature equals the encoder applied to that tile read by hand
    table = read_coords(sorted((tiny_prep / "coords").glob("*.h5"))[1])
    feats, _, _ = read_features(extracted["out"] / f"{table.attrs['slide_id']}.h5")
    slide = Slide(table.slide_path)
    for row in (0, len(table) // 2, len(table) - 1):
        x, y = table.coords[row]
        tile = slide.read_tile_chw((int(x), int(y)), (table.patch_size_level0,) * 2, (128, 128))
        with torch.inference_mode():
            expected = encoder.embed(torch.from_numpy(tile)[None])[0].numpy()
        np.testing.assert_allclose(feats[row], expected, rtol=1e-4, atol=1e-5)


def test_rerun_skips_done_slides_and_redoes_a_truncated_file(
    extracted, tiny_prep, encoder_dir, tmp_path
):
    out = extracted["out"]
    victim = sorted(out.glob("*.h5"))[0]
    victim.write_bytes(victim.read_bytes()[:2000])  # truncated by hand under the final name
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5") if p != victim}
    rows = extract(config(tiny_prep / "coords", out, encoder_dir))
    status = {r["slide_id"]: r["status"] for r in rows}
    assert status.pop(victim.stem) == "done" and set(status.values()) == {"skipped"}
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in out.glob("*.h5") if p != victim)
    assert read_features(victim)[0].shape[0] == len(read_coords(tiny_prep / "coords" / victim.name))
    shutil.copytree(out, tmp_path / "copy")
    other = extract(config(tiny_prep / "coords", tmp_path / "copy", encoder_dir, pooling="mean"))
    assert {r["status"] for r in other} == {"done"}  # another pooling is other features


def extract_cmd(prep, encoder_dir, out, batch: int, *extra: str) -> list[str]:
    """`cpath extract` of the tiny cohort's coords in fp32, one worker, as a subprocess."""
    cmd = [sys.executable, "-m", "pipeline", "extract", "--coords", str(prep / "coords")]
    cmd += ["--encoder", str(encoder_dir), "--out", str(out), "--batch-size", str(batch)]
    return cmd + ["--workers", "1", "--precision", "fp32", "--progress", "false", *extra]


def test_one_and_two_processes_write_identical_features(
    extracted, tiny_prep, encoder_dir, tmp_path
):
    """Two concurrent processes with torchrun's RANK / WORLD_SIZE split the slides."""
    cmd = extract_cmd(tiny_prep, encoder_dir, tmp_path, 32, "--dtype", "float32")
    procs = [
        subprocess.Popen(
            cmd,
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    for path in extracted["out"].glob("*.h5"):
        a, b = read_features(path)[0], read_features(tmp_path / path.name)[0]
        assert np.array_equal(a, b), path.name
    assert (tmp_path / "manifest.shard-0-of-2.csv").is_file()
    assert (tmp_path / "manifest.shard-1-of-2.csv").is_file()


def test_stain_normalization_on_the_device(tiny_prep, encoder_dir, carcinoma_tile, tmp_path):
    from pipeline.stain import make_normalizer

    make_normalizer("macenko").fit(carcinoma_tile).save(tmp_path / "stain.json")
    coords = sorted((tiny_prep / "coords").glob("*.h5"))[0]
    extract(config(coords, tmp_path / "plain", encoder_dir))
    extract(config(coords, tmp_path / "norm", encoder_dir, stain_norm=tmp_path / "stain.json"))
    plain, _, _ = read_features(tmp_path / "plain" / coords.name)
    normed, _, attrs = read_features(tmp_path / "norm" / coords.name)
    assert attrs["stain_norm"].endswith("stain.json") and plain.shape == normed.shape
    assert not np.allclose(plain, normed, atol=1e-3)
    # normalized inside bf16 autocast, as on a GPU: the normalizer keeps to fp32
    extract(
        config(
            coords,
            tmp_path / "bf16",
            encoder_dir,
            stain_norm=tmp_path / "stain.json",
            precision="bf16",
        )
    )
    assert read_features(tmp_path / "bf16" / coords.name)[0].shape == plain.shape
    # features made without normalization are not taken for normalized ones on a rerun
    rows = extract(
        config(coords, tmp_path / "plain", encoder_dir, stain_norm=tmp_path / "stain.json")
    )
    assert [r["status"] for r in rows] == ["done"]


def test_pooling_variants_and_dtype(tiny_prep, encoder_dir, tmp_path):
    coords = sorted((tiny_prep / "coords").glob("*.h5"))[0]
    extract(
        config(coords, tmp_path, encoder_dir, pooling="cls+mean", dtype="float16", precision="bf16")
    )
    feats, _, attrs = read_features(tmp_path / coords.name)
    assert feats.dtype == np.float16 and feats.shape[1] == 96 and attrs["pooling"] == "cls+mean"


def test_killed_run_leaves_no_partial_file_and_resumes(tiny_prep, encoder_dir, tmp_path):
    cmd = extract_cmd(tiny_prep, encoder_dir, tmp_path, 4)
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*.h5")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finals = list(tmp_path.glob("*.h5"))
    assert len(finals) in range(1, 6)  # killed mid-run: some slides done, not all
    for path in finals:
        assert is_complete(path, {})
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(list(tmp_path.glob("*.h5"))) == 6 and not list(tmp_path.glob(".*.tmp"))
    assert "skipped" in done.stdout


def test_bad_inputs_give_clear_errors_and_other_slides_finish(
    tiny_prep, encoder_dir, tmp_path, capsys
):
    def cpath(*args):
        code = main(["extract", "--progress", "false", "--workers", "0", *args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    missing = cpath("--coords", str(tmp_path / "nope"), "--encoder", str(encoder_dir))
    assert missing.returncode == 1 and "no such coords folder" in missing.stderr
    wrong = cpath("--coords", str(tiny_prep / "coords"), "--encoder", "timm:vit_tiny_patch17_224")
    assert (
        wrong.returncode == 1 and "unknown timm architecture 'vit_tiny_patch17_224'" in wrong.stderr
    )
    assert "Traceback" not in missing.stderr + wrong.stderr
    weights = encoder_dir / "model.safetensors"
    mismatch = cpath(
        "--coords",
        str(tiny_prep / "coords"),
        "--encoder",
        "timm:vit_small_patch16_224",
        "--encoder_weights",
        str(weights),
    )
    assert mismatch.returncode == 1 and "weights do not match the architecture" in mismatch.stderr
    unknown = cpath("--coords", str(tiny_prep / "coords"), "--encoder", "myenc")
    assert unknown.returncode == 1 and "unknown encoder 'myenc'" in unknown.stderr

    # one unreadable slide and one slide without tiles among good ones
    coords = tmp_path / "coords"
    shutil.copytree(tiny_prep / "coords", coords)
    first = sorted(coords.glob("*.h5"))[0]
    table = read_coords(first)
    broken_slide = tmp_path / "broken.svs"
    broken_slide.write_bytes(Path(table.slide_path).read_bytes()[:5000])
    attrs = {**table.attrs, "slide_id": "broken", "slide_path": str(broken_slide)}
    write_coords(coords / "broken.h5", table.coords, table.tissue_fraction, attrs)
    write_coords(
        coords / "empty.h5", np.zeros((0, 2)), np.zeros(0), {**table.attrs, "slide_id": "empty"}
    )
    out = tmp_path / "feats"
    done = cpath("--coords", str(coords), "--encoder", str(encoder_dir), "--out", str(out))
    assert done.returncode == 1
    assert "failed broken" in done.stdout and "7 done" in done.stdout and "1 failed" in done.stdout
    assert not (out / "broken.h5").exists() and len(list(out.glob("demo_*.h5"))) == 6
    feats, coords_read, _ = read_features(out / "empty.h5")
    assert feats.shape == (0, 48) and coords_read.shape == (0, 2)


def test_coords_without_slide_paths_and_unreadable_coords(tiny_prep, encoder_dir, tmp_path):
    """CLAM coords (no slide path) need --slides; a broken coords file fails alone."""
    first = sorted((tiny_prep / "coords").glob("*.h5"))[0]
    table = read_coords(first)
    coords = tmp_path / "coords"
    coords.mkdir()
    with h5py.File(coords / first.name, "w") as f:  # as CLAM writes them
        data = f.create_dataset("coords", data=table.coords)
        data.attrs.update(
            {
                "patch_size": table.patch_size,
                "patch_level": 0,
                "downsample": [table.patch_size_level0 / table.patch_size] * 2,
            }
        )
    (coords / "garbage.h5").write_bytes(b"not an hdf5 file")

    rows = extract(config(coords, tmp_path / "a", encoder_dir, workers=0))
    status = {r["slide_id"]: (r["status"], r["error"]) for r in rows}
    assert status["garbage"][0] == "failed" and "garbage.h5" in status["garbage"][1]
    assert status[first.stem][0] == "failed" and "--slides" in status[first.stem][1]

    slides = str(Path(table.slide_path).parent)
    rows = extract(config(coords, tmp_path / "b", encoder_dir, workers=0, slides=slides))
    assert {r["slide_id"]: r["status"] for r in rows} == {first.stem: "done", "garbage": "failed"}
    ours = extract(config(tiny_prep / "coords", tmp_path / "c", encoder_dir, workers=0))
    assert len(ours) == 6
    expected, _, _ = read_features(tmp_path / "c" / first.name)
    feats, xy, attrs = read_features(tmp_path / "b" / first.name)
    assert np.array_equal(feats, expected) and np.array_equal(xy, table.coords)
    assert attrs["slide_path"] == table.slide_path


def test_other_weights_for_an_exported_encoder(tiny_prep, encoder_dir, tmp_path):
    from safetensors.torch import save_file

    state = {k: v + 0.01 for k, v in load_encoder(encoder_dir).model.state_dict().items()}
    weights = tmp_path / "step500.safetensors"
    save_file(state, weights)
    first = sorted((tiny_prep / "coords").glob("*.h5"))[0]
    base = extract(config(first, tmp_path / "a", encoder_dir, workers=0))
    other = extract(config(first, tmp_path / "b", encoder_dir, workers=0, encoder_weights=weights))
    assert base[0]["status"] == other[0]["status"] == "done"
    feats_a, _, attrs_a = read_features(tmp_path / "a" / first.name)
    feats_b, _, attrs_b = read_features(tmp_path / "b" / first.name)
    assert not np.allclose(feats_a, feats_b)
    assert attrs_b["encoder_sha256"] != attrs_a["encoder_sha256"]
    with pytest.raises(Exception, match="takes no weights"):
        load_encoder(f"random:{encoder_dir}", weights=weights)


def test_feature_files_carry_the_coords_attributes_clam_and_trident_read(extracted, tiny_prep):
    """Slide encoders that read TRIDENT's feature files take ``f["coords"].attrs``."""
    for coords_file in sorted((tiny_prep / "coords").glob("*.h5"))[:2]:
        with h5py.File(coords_file) as f:
            want = dict(f["coords"].attrs)
        with h5py.File(extracted["out"] / coords_file.name) as f:
            got = dict(f["coords"].attrs)
            assert f.attrs["weights"] == "pretrained"
        for key in (
            "patch_size",
            "patch_size_level0",
            "level0_magnification",
            "target_magnification",
            "patch_level",
        ):
            assert got[key] == want[key], key
        assert got["target_magnification"] == pytest.approx(20.0)


def test_encoder_is_required_and_random_init_is_said(
    tiny_prep, encoder_dir, tmp_path, capsys, caplog
):
    """No silent random encoder: --encoder is required; a random-init one warns in the log
    and every feature file says ``weights: random``."""
    code = main(["extract", "--coords", str(tiny_prep / "coords"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "extract needs --encoder" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.h5"))

    coords = sorted((tiny_prep / "coords").glob("*.h5"))[0]
    with caplog.at_level("WARNING"):
        extract(config(coords, tmp_path, f"random:{encoder_dir}"))
    assert "random-init weights" in caplog.text
    _, _, attrs = read_features(tmp_path / coords.name)
    assert attrs["weights"] == "random" and attrs["encoder"] == f"random:{encoder_dir}"
    with caplog.at_level("WARNING"):
        caplog.clear()
        assert load_encoder("timm:vit_tiny_patch16_224").weights == "random"
        assert "random-init weights" in caplog.text
        caplog.clear()
        assert load_encoder(encoder_dir).weights == "pretrained" and not caplog.text


@pytest.fixture(scope="module")
def loud_encoder_dir(tmp_path_factory):
    """The tiny encoder with its final norm scaled by 1e6: features far beyond float16."""

    def loud(state: dict) -> dict:
        return {
            **state,
            "norm.weight": state["norm.weight"] * 1e6,
            "norm.bias": state["norm.bias"] * 1e6,
        }

    return save_tiny_encoder(tmp_path_factory.mktemp("loud") / "encoder", edit=loud)


def test_features_beyond_float16_fail_the_slide_or_go_float32(
    tiny_prep, loud_encoder_dir, tmp_path
):
    coords = sorted((tiny_prep / "coords").glob("*.h5"))[:2]
    listing = tmp_path / "two.txt"
    listing.write_text("\n".join(map(str, coords)))
    rows = extract(config(listing, tmp_path / "f16", loud_encoder_dir, dtype="float16"))
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert (
        "exceed float16's range" in rows[0]["error"]
        and "--dtype float32 or auto" in rows[0]["error"]
    )
    assert not list((tmp_path / "f16").glob("*.h5"))  # never written as inf

    rows = extract(config(listing, tmp_path / "auto", loud_encoder_dir, dtype="auto"))
    assert [r["status"] for r in rows] == ["done", "done"]
    reference = extract(config(listing, tmp_path / "f32", loud_encoder_dir, dtype="float32"))
    assert [r["status"] for r in reference] == ["done", "done"]
    for c in coords:
        auto, _, attrs = read_features(tmp_path / "auto" / c.name)
        exact, _, _ = read_features(tmp_path / "f32" / c.name)
        assert auto.dtype == np.float32 and np.abs(auto).max() > 65504
        np.testing.assert_array_equal(auto, exact)
        assert attrs["dtype"] == "auto"
    rerun = extract(config(listing, tmp_path / "auto", loud_encoder_dir, dtype="auto"))
    assert [r["status"] for r in rerun] == ["skipped", "skipped"]


def test_feature_writer_refuses_non_finite_rows_and_widens_mid_slide(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.features import FeatureWriter

    coords = np.zeros((6, 2), np.int64)
    rows = np.arange(18, dtype=np.float32).reshape(6, 3)
    writer = FeatureWriter(tmp_path / "nan.h5", 6, 3, coords, {}, "float32")
    bad = rows[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(PipelineError, match="NaN or inf features for 1 tiles \\(rows 1\\)"):
        writer.write(bad, 0)
    writer.abort()
    # auto: float16 rows written first, then a row beyond float16 moves everything to float32
    writer = FeatureWriter(tmp_path / "auto.h5", 6, 3, coords, {}, "auto", chunk_rows=2)
    writer.write(rows[:4] + 0.1, 0)
    big = rows[4:] * 1e5
    writer.write(big, 4)
    writer.close()
    feats, _, _ = read_features(tmp_path / "auto.h5")
    assert feats.dtype == np.float32
    np.testing.assert_array_equal(feats[:4], (rows[:4] + 0.1).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(feats[4:], big)


def test_encoder_pretrained_on_normalised_tiles_gets_its_normalizer_by_default(
    tiny_prep, tmp_path, caplog
):
    from pipeline.ssl.export import stain_norm_record

    exapath = save_tiny_encoder(
        tmp_path / "exapath", extra={"stain_norm": stain_norm_record("exapath")}
    )
    coords = sorted((tiny_prep / "coords").glob("*.h5"))[0]
    with caplog.at_level("INFO", logger="pipeline.extraction"):
        extract(config(coords, tmp_path / "default", exapath))
    assert "applying the stain normalizer" in caplog.text and "WARNING" not in caplog.text
    extract(config(coords, tmp_path / "named", exapath, stain_norm="exapath"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.extraction"):
        extract(config(coords, tmp_path / "raw", exapath, stain_norm="none"))
    assert "pretrained on tiles normalised with exapath" in caplog.text
    default, _, attrs = read_features(tmp_path / "default" / coords.name)
    named, _, named_attrs = read_features(tmp_path / "named" / coords.name)
    raw, _, raw_attrs = read_features(tmp_path / "raw" / coords.name)
    np.testing.assert_array_equal(default, named)  # the encoder's own normalizer is EXAPath's
    assert not np.allclose(default, raw, atol=1e-3)
    assert attrs["stain_norm"] == "encoder:exapath" and raw_attrs["stain_norm"] == ""
    assert attrs["stain_norm_sha256"] == named_attrs["stain_norm_sha256"] != ""
    # another normalizer than the encoder's: applied, with a warning
    from pipeline.stain import make_normalizer

    other = tmp_path / "other.json"
    make_normalizer("reinhard").fit(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)).save(
        other
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.extraction"):
        extract(config(coords, tmp_path / "other", exapath, stain_norm=other))
    assert "is another normalizer" in caplog.text

import numpy as np

from pipeline.data.synth import (
    STRIP,
    Quilt,
    SlideLayout,
    blob_field,
    field_masks,
    render_slide,
    smooth_noise,
)


def _layout(rng, with_tumor=True):
    ds, h, w = 16, 1500, 1900
    mh, mw = -(-h // ds), -(-w // ds)
    wobble = smooth_noise((mh, mw), 4.0, rng)
    tissue = blob_field((mh, mw), (mh / 2, mw / 2), (mh / 3, mw / 3), 0.3, wobble, 0.1)
    tumor = None
    if with_tumor:
        tumor = blob_field((mh, mw), (mh / 2, mw / 2), (8.0, 10.0), 0.0, wobble, 0.05)
        tumor = np.minimum(tumor, tissue)
    return SlideLayout(w, h, ds, tissue, tumor, None)


def test_regions_get_their_texture_and_glass_its_tint():
    rng = np.random.default_rng(0)
    layout = _layout(rng)
    red = np.zeros((400, 400, 3), np.uint8) + np.array([200, 40, 60], np.uint8)
    blue = np.zeros((400, 400, 3), np.uint8) + np.array([60, 40, 180], np.uint8)
    quilts = {
        "normal": Quilt([red], 160, layout.height, layout.width, rng),
        "tumor": Quilt([blue], 96, layout.height, layout.width, rng),
    }
    image, drawn = render_slide(layout, quilts, (240, 240, 240), rng)
    masks = field_masks(layout)
    assert drawn["tumor"].sum() < drawn["normal"].sum() < drawn["normal"].size
    assert image.shape == (1500, 1900, 3)
    ds = layout.mask_downsample
    centres = image[ds // 2 :: ds, ds // 2 :: ds].astype(int)  # one level-0 px per mask px
    interior = masks["tissue"] & ~masks["tumor"]
    np.testing.assert_allclose(np.median(centres[interior], 0), [200, 40, 60], atol=2)
    np.testing.assert_allclose(np.median(centres[masks["tumor"]], 0), [60, 40, 180], atol=2)
    np.testing.assert_allclose(np.median(centres[~masks["tissue"]], 0), [240, 240, 240], atol=2)
    assert masks["tumor"].sum() > 100 and not (masks["tumor"] & ~masks["tissue"]).any()


def test_quilting_leaves_no_seams():
    """Blend weights of overlapping patches sum to one: a flat texture stays flat, on a
    cell grid (stride 80 px) that does not line up with the rendered strips (256 px)."""
    rng = np.random.default_rng(1)
    layout = _layout(rng, with_tumor=False)
    flat = np.full((400, 400, 3), (150, 60, 120), np.uint8)
    quilt = Quilt([flat[:200], flat[200:]], 100, layout.height, layout.width, rng)
    assert quilt.stride == 80 and STRIP % quilt.stride
    image, _ = render_slide(layout, {"normal": quilt}, (240, 240, 240), rng)
    inside = field_masks(layout)["tissue"]
    ds = layout.mask_downsample
    core = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2]
    core &= inside[1:-1, 2:]
    ys, xs = np.nonzero(core)
    # every level-0 pixel of interior mask blocks, across strip and patch borders
    block = np.stack(
        [
            image[(y + 1) * ds : (y + 2) * ds, (x + 1) * ds : (x + 2) * ds]
            for y, x in zip(ys, xs, strict=True)
        ]
    )
    assert len(ys) * ds > 2 * STRIP
    assert np.abs(block.astype(int) - [150, 60, 120]).max() <= 1


def test_quilt_patches_come_from_dense_windows_inside_one_block():
    """Each cell's patch lies inside its block, on a window at least 80% tissue."""
    rng = np.random.default_rng(2)
    tissue = np.zeros((300, 300, 3), np.uint8) + np.array([180, 60, 140], np.uint8)
    half = tissue.copy()
    half[:, 150:] = 245  # unstained glass on the right half
    quilt = Quilt([tissue[:120], half], 64, 800, 900, rng)
    assert set(np.unique(quilt.block)) == {0, 1}
    for r in range(quilt.rows):
        for c in range(quilt.cols):
            block = quilt.blocks[quilt.block[r, c]]
            y, x = quilt.offsets[r, c]
            assert 0 <= y <= block.shape[0] - 64 and 0 <= x <= block.shape[1] - 64
            patch = quilt.patch_at(r, c).astype(int)
            assert patch.shape == (64, 64, 3)
            assert ((patch.max(-1) - patch.min(-1)) > 20).mean() >= 0.8 - 1 / 8

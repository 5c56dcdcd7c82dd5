import numpy as np

from pipeline.data.synth import (
    STRIP,
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
    image = render_slide(layout, red, blue, (240, 240, 240), rng)
    masks = field_masks(layout)
    assert image.shape == (1500, 1900, 3)
    ds = layout.mask_downsample
    centres = image[ds // 2 :: ds, ds // 2 :: ds].astype(int)  # one level-0 px per mask px
    interior = masks["tissue"] & ~masks["tumor"]
    np.testing.assert_allclose(np.median(centres[interior], 0), [200, 40, 60], atol=2)
    np.testing.assert_allclose(np.median(centres[masks["tumor"]], 0), [60, 40, 180], atol=2)
    np.testing.assert_allclose(np.median(centres[~masks["tissue"]], 0), [240, 240, 240], atol=2)
    assert masks["tumor"].sum() > 100 and not (masks["tumor"] & ~masks["tissue"]).any()


def test_quilting_leaves_no_seams():
    """Blend weights of overlapping patches sum to one: a flat texture stays flat."""
    rng = np.random.default_rng(1)
    layout = _layout(rng, with_tumor=False)
    flat = np.full((400, 400, 3), (150, 60, 120), np.uint8)
    image = render_slide(layout, flat, flat, (240, 240, 240), rng)
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

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.features import read_features
from pipeline.mil.bags import BagStore, collate
from pipeline.mil.splits import fold_members, make_splits, read_splits, write_splits


def cohort(n_cases=30, seed=0):
    """Patients with one or two slides, a third of them tumour."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cases):
        label = "tumor" if c % 3 == 0 else "normal"
        for s in range(1 + int(rng.random() < 0.4)):
            rows.append({"slide_id": f"s{c:02d}_{s}", "case_id": f"c{c:02d}", "label": label})
    return rows


def test_folds_partition_slides_keep_patients_together_and_stay_stratified(tmp_path):
    rows = make_splits(cohort(), folds=5, val_share=0.2, seed=1)
    tests = [set(fold_members(rows, k, "test")) for k in range(5)]
    assert set().union(*tests) == {r["slide_id"] for r in rows}
    assert sum(len(t) for t in tests) == len(rows)  # each slide tested exactly once
    case = {r["slide_id"]: r["case_id"] for r in rows}
    label = {r["slide_id"]: r["label"] for r in rows}
    for k in range(5):
        roles = {
            role: {case[s] for s in fold_members(rows, k, role)}
            for role in ("train", "val", "test")
        }
        assert not (roles["train"] & roles["test"]) and not (roles["val"] & roles["test"])
        assert not (roles["train"] & roles["val"]) and roles["val"]
        share = np.mean([label[s] == "tumor" for s in fold_members(rows, k, "test")])
        assert 0.1 <= share <= 0.6  # about a third in every test fold
    path = write_splits(tmp_path / "splits.csv", rows)
    assert read_splits(path) == [{k: str(v) for k, v in r.items()} for r in rows]


def test_fixed_test_set_and_bad_inputs(tmp_path):
    rows = make_splits(cohort(), folds=3, test_slides={"s00_0", "s01_0"})
    assert all(
        r[f"fold_{k}"] == "test"
        for r in rows
        if r["slide_id"] in {"s00_0", "s01_0"}
        for k in range(3)
    )
    with pytest.raises(PipelineError, match="at least 5 patients"):
        make_splits(cohort(n_cases=3), folds=5)
    (tmp_path / "bad.csv").write_text("slide_id,case_id,label,fold_0\na,b,c,training\n")
    with pytest.raises(PipelineError, match="roles must be train, val or test"):
        read_splits(tmp_path / "bad.csv")


def test_bag_store_holds_each_slide_once_and_batches_pad_with_masks(tiny_features):
    features = tiny_features
    ids = sorted(p.stem for p in features.glob("*.h5"))
    store = BagStore(features, ids)
    for slide_id in ids:
        feats, coords, _ = read_features(features / f"{slide_id}.h5")
        assert torch.equal(store.bag(slide_id), torch.from_numpy(feats))
        assert torch.equal(store.bag_coords(slide_id), torch.from_numpy(coords))
    x, mask = collate(store, ids[:3])
    lengths = [len(store.bag(s)) for s in ids[:3]]
    assert x.shape == (3, max(lengths), 16) and mask.sum(1).tolist() == lengths
    assert torch.equal(x[0, : lengths[0]], store.bag(ids[0])) and (x[~mask] == 0).all()
    g = torch.Generator().manual_seed(0)
    sub, sub_mask = collate(store, ids[:3], max_instances=10, generator=g)
    assert sub.shape[1] == 10 and sub_mask.sum(1).tolist() == [min(n, 10) for n in lengths]
    rows = {tuple(r.tolist()) for r in store.bag(ids[0])}
    assert all(tuple(r.tolist()) in rows for r in sub[0, : min(lengths[0], 10)])
    with pytest.raises(PipelineError, match="no features for 1 slides"):
        BagStore(features, [*ids, "missing_slide"])

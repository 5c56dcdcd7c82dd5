"""Survival losses, metrics and bins against lifelines and their definitions (tied times)."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index as lifelines_cindex

from pipeline.errors import ConfigError
from pipeline.mil.metrics import (
    concordance_index,
    integrated_brier_score,
    survival_horizons,
    survival_metrics,
    time_dependent_auc,
)
from pipeline.mil.train import TrainMILConfig
from pipeline.mil.training import (
    Targets,
    bag_loader,
    bin_edges,
    cox_loss,
    cox_survival,
    discrete_survival,
    mil_device,
    mil_trainer,
)


def tied_cohort(seed: int, n: int = 60) -> pd.DataFrame:
    """Integer times 1..8 (many ties, events and censorings at the same times) and one
    covariate that raises the hazard."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    time = np.clip(np.round(rng.exponential(4 * np.exp(-0.7 * x))), 1, 8)
    event = (rng.random(n) < 0.7).astype(float)
    return pd.DataFrame({"x": x, "time": time, "event": event})


def has_ties(df: pd.DataFrame) -> bool:
    """Tied event times, and an event and a censoring at one time."""
    events = df.time[df.event > 0]
    censored = df.time[df.event == 0]
    return events.duplicated().any() and bool(set(events) & set(censored))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cox_loss_is_lifelines_efron_partial_likelihood_with_ties(seed):
    df = tied_cohort(seed)
    assert has_ties(df)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = CoxPHFitter().fit(df, "time", "event")  # Efron's ties
    beta = float(fit.params_["x"])
    risk = torch.tensor(beta * df.x.to_numpy(), dtype=torch.float32)
    time = torch.tensor(df.time.to_numpy(), dtype=torch.float32)
    event = torch.tensor(df.event.to_numpy(), dtype=torch.float32)
    loss = cox_loss(risk, time, event, "efron")
    # lifelines' log-likelihood is the sum over events; cox_loss is per event
    expected = -fit.log_likelihood_ / df.event.sum()
    assert abs(loss.item() - expected) < 1e-6
    # the risk sets do not depend on the order of the bags
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(df)))
    assert abs(cox_loss(risk[perm], time[perm], event[perm]).item() - loss.item()) < 1e-6


def test_breslow_ties_follow_their_formula():
    df = tied_cohort(0)
    risk, time, event = (df[k].to_numpy() for k in ("x", "time", "event"))
    # Breslow (1974): each event time k adds m_k log sum_{t_j >= t_k} e^r_j - sum_{events} r
    expected = 0.0
    for t in np.unique(time[event > 0]):
        dead = (time == t) & (event > 0)
        expected += dead.sum() * np.log(np.exp(risk[time >= t]).sum()) - risk[dead].sum()
    expected /= event.sum()
    args = [torch.tensor(a, dtype=torch.float32) for a in (risk, time, event)]
    assert cox_loss(*args, "breslow").item() == pytest.approx(expected, abs=1e-6)
    assert cox_loss(*args, "breslow").item() != pytest.approx(cox_loss(*args, "efron").item())
    distinct = [
        torch.tensor([0.3, -1.0, 2.0, 0.5]),
        torch.tensor([1.0, 2.0, 3.0, 3.0]),
        torch.tensor([1.0, 1.0, 1.0, 0.0]),
    ]
    assert cox_loss(*distinct, "breslow") == pytest.approx(cox_loss(*distinct, "efron").item())


def test_cox_loss_without_events_or_with_one_bag_is_zero_and_differentiable():
    risk = torch.tensor([0.5, -0.2], requires_grad=True)
    loss = cox_loss(risk, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    loss.backward()
    assert loss.item() == 0 and torch.equal(risk.grad, torch.zeros(2))
    assert cox_loss(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([1.0])).item() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concordance_index_is_lifelines_with_tied_times_and_risks(seed):
    df = tied_cohort(seed)
    assert has_ties(df)
    rng = np.random.default_rng(seed)
    risk = np.round(df.x.to_numpy() + rng.normal(0, 0.5, len(df)), 1)  # tied risks too
    assert len(np.unique(risk)) < len(risk)
    time, event = df.time.to_numpy(), df.event.to_numpy()
    # lifelines scores predicted survival times: higher = later event, so -risk
    expected = lifelines_cindex(time, -risk, event)
    assert abs(concordance_index(time, event, risk) - expected) < 1e-6


def test_concordance_counts_an_event_before_a_censoring_at_the_same_time():
    # slide 0 dies at 5, slide 1 is censored at 5: comparable, and ranked right
    assert concordance_index([5, 5], [1, 0], [2.0, 1.0]) == 1.0
    assert concordance_index([5, 5], [1, 0], [1.0, 2.0]) == 0.0
    assert np.isnan(concordance_index([5, 5], [1, 1], [1.0, 2.0]))  # two deaths at one time


def test_time_dependent_auc_and_brier_score_at_their_extremes():
    time = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
    event = np.ones(8)
    horizons = [2.5, 4.5, 6.5]
    risk = -time  # earlier death, higher risk: perfect ranking
    assert time_dependent_auc(time, event, risk, horizons) == pytest.approx(1.0)
    assert time_dependent_auc(time, event, -risk, horizons) == pytest.approx(0.0)
    alive = (time[:, None] > np.array(horizons)).astype(float)  # 8 x 3: the true status
    assert integrated_brier_score(time, event, alive, horizons) == pytest.approx(0.0)
    assert integrated_brier_score(time, event, np.full((8, 3), 0.5), horizons) == pytest.approx(
        0.25
    )
    # a horizon after the last follow-up time: not defined
    assert np.isnan(time_dependent_auc(time, event, risk, [2.5, 9.0]))
    assert np.isnan(integrated_brier_score(time, event, alive[:, :2], [2.5, 9.0]))
    scores = survival_metrics(time, event, risk, alive, horizons)
    assert set(scores) == {"c_index", "td_auc", "ibs"} and scores["c_index"] == 1.0
    assert set(survival_metrics(time, event, risk)) == {"c_index"}


def test_horizons_are_quartiles_of_event_times():
    time, event = np.arange(1.0, 11.0), np.array([1, 0] * 5)
    assert survival_horizons(time, event) == list(np.quantile([1.0, 3, 5, 7, 9], [0.25, 0.5, 0.75]))


def _rows(times: dict[str, float], events: dict[str, int]) -> list[dict]:
    """Two slides per patient p0..p9 (same time and event), slide ids p<i>_a, p<i>_b."""
    return [
        {
            "slide_id": f"{p}_{s}",
            "case_id": p,
            "time": times[p],
            "event": events[p],
            "label": str(events[p]),
        }
        for p in times
        for s in "ab"
    ]


def test_bins_come_from_the_training_patients_only():
    patients = [f"p{i}" for i in range(10)]
    times = {p: float(3 * i + 1) for i, p in enumerate(patients)}
    events = {p: int(i % 4 != 3) for i, p in enumerate(patients)}
    train = [f"{p}_{s}" for p in patients[:7] for s in "ab"]  # p7..p9 are tested
    edges = Targets(_rows(times, events), "survival", [], 4).for_training(train).edges
    # one time per patient: quantiles of the training patients' event times
    expected = np.quantile([times[p] for p in patients[:7] if events[p]], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(edges, expected)
    np.testing.assert_allclose(bin_edges(_rows(times, events)[:14], 4), expected)
    moved = {**times, "p8": 500.0, "p9": 0.5}  # the test patients' times do not count
    again = Targets(_rows(moved, events), "survival", [], 4).for_training(train).edges
    np.testing.assert_array_equal(again, edges)
    batch = Targets(_rows(times, events), "survival", [], 4).for_training(train).batch(train[:4])
    assert batch["bin"].tolist() == np.searchsorted(edges, [1, 1, 4, 4], side="right").tolist()


def test_discrete_survival_counts_a_bins_deaths_at_its_end():
    logits = torch.tensor([[0.0, 1.0, -1.0]])  # hazards h_0, h_1, h_2 of bins [-, 10, 20, -]
    h = torch.sigmoid(logits[0]).double()
    surv = discrete_survival(logits, np.array([10.0, 20.0]), [5.0, 10.0, 15.0, 25.0])
    expected = [1.0, 1 - h[0], 1 - h[0], (1 - h[0]) * (1 - h[1])]
    np.testing.assert_allclose(surv[0], expected)


def test_cox_survival_is_the_breslow_baseline_to_the_relative_hazard():
    time = np.array([1.0, 2, 2, 3, 4])
    event = np.array([1, 1, 0, 1, 0])
    risk = np.array([0.5, 0.2, -0.3, 0.1, -1.0])
    # Breslow (1972): H_0(t) = sum over event times t_k <= t of d_k / sum_{t_j >= t_k} e^r_j
    h0 = {t: event[time == t].sum() / np.exp(risk[time >= t]).sum() for t in np.unique(time)}
    cum = np.cumsum([h0[t] for t in sorted(h0)])  # at 1, 2, 3, 4
    new = np.array([0.0, 1.0])
    surv = cox_survival(risk, time, event, new, [0.5, 2.5, 3.0])
    expected = np.exp(-np.outer(np.exp(new), [0.0, cum[1], cum[2]]))
    np.testing.assert_allclose(surv, expected, rtol=1e-6)
    one = cox_survival(risk, time, event, new[1:], [2.5])  # one slide, one horizon
    np.testing.assert_allclose(one, expected[1:, 1:2], rtol=1e-6)
    assert np.isnan(cox_survival(risk, time, 0 * event, new, [2.5])).all()  # no event


def test_validation_loader_yields_one_bag_per_step():
    cfg = TrainMILConfig(task="survival", survival_loss="cox", batch_size=8)
    targets = Targets(_rows({"p0": 1.0, "p1": 2.0}, {"p0": 1, "p1": 0}), "survival", [], 4)
    ids = list(targets.by_id)
    assert bag_loader(ids, None, targets, cfg, False, None).batch_size == 1
    assert bag_loader(ids, None, targets, cfg, True, None).batch_size == 8


def test_device_follows_the_config():
    cuda = torch.cuda.is_available()
    assert mil_device(TrainMILConfig(device="cpu")) == torch.device("cpu")
    assert mil_device(TrainMILConfig(device="auto")).type == ("cuda" if cuda else "cpu")
    trainer = mil_trainer(TrainMILConfig(device="cpu", epochs=1), logger=False)
    assert trainer.strategy.root_device == torch.device("cpu") and trainer.precision == "32-true"
    if cuda:
        assert mil_device(TrainMILConfig(device="cuda:0")) == torch.device("cuda", 0)
    else:
        with pytest.raises(ConfigError, match="no GPU"):
            mil_device(TrainMILConfig(device="cuda"))
    with pytest.raises(ConfigError, match="use auto, cpu, cuda"):
        mil_device(TrainMILConfig(device="tpu"))

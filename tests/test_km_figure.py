"""The one Kaplan-Meier figure (`cancermoe.km_figure`): curves, group sizes and numbers at risk, from patients
(cmoe-predict) and from pooled counts (the federated server), checked against scikit-survival and the counts."""

from __future__ import annotations

import numpy as np
import pytest
from sksurv.nonparametric import kaplan_meier_estimator

from cancermoe.km_figure import KMCurve, KMPanel, at_risk_ticks, group_label, km_figure, write_km_figure
from cancermoe.survival import km_counts, km_curve_from_counts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cohort(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    death_time = np.round(rng.exponential(30.0, size=n), 1)  # rounded: tied times occur
    censor_time = np.round(rng.uniform(0, 70, size=n), 1)
    return np.minimum(death_time, censor_time), death_time <= censor_time


def test_a_curve_from_patients_is_scikit_survivals_kaplan_meier_with_exact_numbers_at_risk() -> None:
    months, death = cohort(0)
    curve = KMCurve.from_patients("high", months, death)
    times, survival = kaplan_meier_estimator(death, months)
    changes = np.concatenate([[True], np.diff(survival) != 0])  # sksurv lists censoring-only times too
    np.testing.assert_allclose(curve.survival, survival[changes])
    np.testing.assert_array_equal(curve.times, times[changes])
    assert (curve.n, curve.deaths) == (60, int(death.sum()))
    for t in (0.0, 5.0, 12.3, months.max(), months.max() + 1):
        assert curve.at_risk([t])[0] == np.count_nonzero(months >= t), t
    assert curve.label == "predicted high risk (n=60)"


def test_a_curve_from_binned_counts_has_the_counts_numbers_at_risk_and_life_table_survival() -> None:
    months, death = cohort(1)
    edges = np.append(np.arange(0.0, 72.0, 2.0), np.inf)
    counts = km_counts(months, (~death).astype(int), edges)
    curve = KMCurve.from_counts("low", counts)
    assert (curve.n, curve.deaths) == (60, int(death.sum()))
    ticks = edges[:-1:6]  # 0, 12, 24, ...
    np.testing.assert_array_equal(curve.at_risk(ticks), [np.count_nonzero(months >= t) for t in ticks])
    with_deaths = counts.deaths > 0
    np.testing.assert_allclose(curve.survival, km_curve_from_counts(counts)[with_deaths])
    np.testing.assert_array_equal(curve.times, edges[1:][with_deaths])  # each drop at its bin's end


def test_the_figure_names_predicted_groups_and_ticks_whole_months(tmp_path) -> None:
    assert group_label("intermediate") == "predicted intermediate risk"
    months, death = cohort(2)
    panel = KMPanel("BRCA", [KMCurve.from_patients("low", months[:30], death[:30]),
                             KMCurve.from_patients("high", months[30:], death[30:])], 0.01)
    assert [c.group for c in panel.ordered()] == ["high", "low"]
    ticks = at_risk_ticks(panel)
    assert ticks[0] == 0 and ticks[-1] <= months.max() and all(float(t).is_integer() for t in ticks)
    figure = km_figure([panel], suptitle="test")
    curves, table = figure.axes
    assert [t.get_text() for t in curves.get_legend().get_texts()] == ["predicted high risk (n=30)",
                                                                         "predicted low risk (n=30)"]
    assert "log-rank p = 0.01" in curves.get_title()
    shown = [[int(t.get_text()) for t in table.texts if t.get_position()[1] == row] for row in (0, 1)]
    assert shown == [list(c.at_risk(ticks)) for c in panel.ordered()]  # the numbers at risk, high first
    path = write_km_figure([panel, panel], tmp_path / "km.png", suptitle="test")
    assert path.read_bytes()[:8] == PNG_MAGIC and [p.name for p in tmp_path.iterdir()] == ["km.png"]
    with pytest.raises(ValueError, match="no panel"):
        write_km_figure([], tmp_path / "none.png")

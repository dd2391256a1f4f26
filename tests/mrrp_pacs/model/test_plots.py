"""Figures: numbers at risk, calibration points and net benefit by hand; PNG files written,
sized and byte-identical on a second run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mrrp_pacs.model import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(4)
    n = 200
    risk = rng.normal(size=n)
    latent = rng.exponential(100.0 * np.exp(-risk))
    censor = rng.uniform(24.0, 150.0, n)
    return {"time": np.round(np.minimum(latent, censor), 1), "event": latent <= censor,
            "risk": risk, "group": (risk > 0).astype(int),
            "survival": np.exp(-np.outer(np.exp(risk), [36.0, 60.0, 84.0]) / 100.0)}


def assert_png(path, width: int, height: int) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    with Image.open(path) as image:
        assert image.size == (width, height)


def test_numbers_at_risk_by_hand():
    time = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 8.0])
    group = np.array([0, 0, 1, 1, 0, 1])
    counts = plots.at_risk_counts(time, group, [0.0, 2.0, 4.0, 8.0])
    # group 0 followed to 1, 2, 5; group 1 to 2, 3, 8 (still at risk at its own time)
    assert counts.tolist() == [[3, 2, 1, 0], [3, 3, 1, 1]]


def test_km_by_group_writes_a_deterministic_png_and_marks_a_group(cohort, tmp_path):
    args = (cohort["time"], cohort["event"], cohort["group"])
    path = plots.km_by_group(*args, tmp_path / "km" / "groups.png")
    assert_png(path, 840, int((4.6 + 0.2 + 0.22 * 2) * 120))  # matplotlib truncates
    again = plots.km_by_group(*args, tmp_path / "again.png")
    assert again.read_bytes() == path.read_bytes()
    marked = plots.km_by_group(*args, tmp_path / "marked.png", mark=1)
    assert marked.read_bytes() != path.read_bytes()
    bare = plots.km_by_group(*args, tmp_path / "bare.png", numbers_at_risk=False)
    assert_png(bare, 840, round(4.6 * 120))
    with pytest.raises(ValueError, match="mark=3"):
        plots.km_by_group(*args, tmp_path / "bad.png", mark=3)


def test_td_auc_plot_shows_missing_horizons(tmp_path):
    path = plots.td_auc_plot({"36": 0.81, "60": 0.77, "84": None}, tmp_path / "auc.png")
    assert_png(path, 600, 456)


def test_calibration_points_by_hand_and_on_calibrated_data(cohort):
    predicted = np.array([0.9, 0.8, 0.6, 0.5])
    time = np.array([10.0, 3.0, 2.0, 10.0])
    event = np.array([False, True, True, False])
    mean, observed = plots.calibration_points(predicted, time, event, 5.0, bins=2)
    # bins sorted by prediction: {0.5, 0.6} (one event of two) and {0.8, 0.9} (one of two)
    assert mean.tolist() == pytest.approx([0.55, 0.85]) and observed.tolist() == [0.5, 0.5]
    assert np.isnan(plots.calibration_points(predicted, time, event, 11.0, bins=2)[1]).all()
    # the fixture's predictions are the true survival: points lie near the diagonal
    mean, observed = plots.calibration_points(cohort["survival"][:, 0], cohort["time"],
                                              cohort["event"], 36.0, bins=4)
    assert np.all(np.diff(mean) > 0) and np.abs(mean - observed).max() < 0.12


def test_calibration_plot_one_panel_per_horizon(cohort, tmp_path):
    path = plots.calibration_plot(cohort["survival"], cohort["time"], cohort["event"],
                                  tmp_path / "calibration.png", bins=5)
    assert_png(path, round(3.6 * 3 * 120), 456)
    with pytest.raises(ValueError, match="predicted_survival must have shape"):
        plots.calibration_plot(cohort["survival"][:, :2], cohort["time"], cohort["event"],
                               tmp_path / "x.png")


def test_net_benefit_without_censoring_is_the_binary_formula():
    risk = np.array([0.9, 0.7, 0.4, 0.2, 0.1])
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    event = np.array([True, False, True, False, False])
    time[~event] = 20.0  # followed past t: known event-free at t
    model, treat_all = plots.net_benefit(risk, time, event, 10.0, np.array([0.3, 0.5, 0.95]))
    # threshold 0.3: treat 3 (2 events) → 2/5 - 1/5 · 0.3/0.7
    # threshold 0.5: treat 2 (1 event) → 1/5 - 1/5 · 1; 0.95: nobody treated → 0
    assert model.tolist() == pytest.approx([0.4 - 0.2 * 0.3 / 0.7, 0.0, 0.0])
    assert treat_all.tolist() == pytest.approx([0.4 - 0.6 * 0.3 / 0.7, 0.4 - 0.6, 0.4 - 0.6 * 19])
    with pytest.raises(ValueError, match="thresholds"):
        plots.net_benefit(risk, time, event, 10.0, np.array([0.0, 0.5]))


def test_decision_curve_png(cohort, tmp_path):
    path = plots.decision_curve(1 - cohort["survival"][:, 1], cohort["time"], cohort["event"],
                                60.0, tmp_path / "dca.png")
    assert_png(path, 672, 480)

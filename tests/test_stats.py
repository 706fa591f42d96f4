"""Statistics over replicates (src/pipeline/stats.py): paired intervals and the verdict words they
earn, checked on planted numbers; the plateau criterion on planted curves."""
import numpy as np
import pytest

from pipeline import stats


def test_the_evidence_runs_moderate_pairs_resolve_nothing():
    """The moderate students minus their teachers in the evidence run (+3.5, +15.0, +7.4 digits-FD):
    mean +8.63, t(2) interval -5.89 to +23.16 (the issue: -5.9 to +23.1), which holds 0."""
    d = stats.paired_difference([53.5, 65.0, 57.4], [50.0, 50.0, 50.0])
    assert d.differences == pytest.approx((3.5, 15.0, 7.4))
    assert d.interval.mean == pytest.approx(8.633, abs=1e-3)
    assert (d.interval.low, d.interval.high) == pytest.approx((-5.895, 23.161), abs=1e-3)
    assert d.verdict == "no difference resolved"
    assert d.cell() == "+8.63 [-5.89, +23.16] no difference resolved"


def test_planted_improvement_and_degradation_and_the_side_that_is_better():
    teacher = [50.0, 52.0, 49.0, 51.0, 50.5]
    better = stats.paired_difference([45.2, 47.1, 44.0, 46.3, 45.9], teacher)
    worse = stats.paired_difference([55.1, 57.4, 53.8, 56.2, 55.0], teacher)
    assert better.verdict == "better" and better.interval.high < 0
    assert worse.verdict == "worse" and worse.interval.low > 0
    # where higher is better (a CLIP score) the same numbers read the other way round
    assert stats.paired_difference([45.2, 47.1, 44.0, 46.3, 45.9], teacher, lower_is_better=False).verdict == "worse"
    # memorization: fewer copies is "less"
    assert stats.paired_difference([0.001, 0.0, 0.002], [0.30, 0.26, 0.34],
                                   words=stats.MEMORIZATION_WORDS).verdict == "less"


def test_equality_needs_the_whole_interval_inside_the_tolerance():
    small = stats.paired_difference([50.2, 49.9, 50.1, 50.0], [50.0, 50.0, 50.0, 50.1], tolerance=1.0)
    assert small.verdict == "equal within 1"
    wide = stats.paired_difference([50.2, 47.0, 53.1, 50.0], [50.0, 50.0, 50.0, 50.1], tolerance=1.0)
    assert wide.verdict == "no difference resolved"


def test_one_replicate_has_no_interval():
    d = stats.paired_difference([55.0], [50.0])
    assert d.interval.low is None and d.verdict == "not resolved (1 replicate)"
    assert d.cell() == "+5.00 not resolved (1 replicate)"
    with pytest.raises(ValueError, match="same length"):
        stats.paired_difference([1.0, 2.0], [1.0])


def test_interval_matches_scipy():
    from scipy import stats as sps

    x = np.array([0.3, -1.2, 2.5, 0.8, 1.1, -0.4])
    i = stats.t_interval(x, 0.9)
    low, high = sps.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert (i.low, i.high) == pytest.approx((low, high), rel=1e-12)


def test_plateau_rejects_a_still_falling_curve_and_accepts_a_flat_noisy_one():
    rng = np.random.default_rng(0)
    steps = np.arange(0, 3001, 200)
    falling = 80 * np.exp(-steps / 2500) + 40 + rng.normal(0, 0.3, len(steps))
    flat = 45 + rng.normal(0, 1.0, len(steps))
    a = stats.plateau(steps, falling)
    b = stats.plateau(steps, flat)
    assert a.verdict == "still improving" and a.high < 0 and a.points == 6
    assert b.verdict == "plateau" and b.low <= 0 <= b.high and b.reached
    rising = stats.plateau(steps, 40 + steps / 100 + rng.normal(0, 0.3, len(steps)))
    assert rising.verdict == "still worsening"
    # two points in the last third are not called flat
    few = stats.plateau([0, 1000, 2000, 3000], [60, 50, 48, 47])
    assert few.verdict.startswith("not assessed") and not few.reached

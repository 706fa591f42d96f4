"""The pairing statistics (src/pipeline/pairing.py): invariant to rescaling and shifting the data, 0 for
a student that is the teacher's own map, about 1 for a student whose pairing is a random re-pairing."""
import numpy as np
import pytest

from pipeline import pairing


@pytest.fixture
def teacher():
    return np.random.default_rng(0).standard_normal((300, 16)) + np.repeat(np.eye(16)[:3] * 4, 100, axis=0)


def test_random_pair_cost_is_the_mean_over_off_diagonal_pairs(teacher):
    student = teacher + np.random.default_rng(1).standard_normal(teacher.shape)
    cost = ((student[:, None] - teacher[None]) ** 2).sum(-1)
    off = cost[~np.eye(len(cost), dtype=bool)].mean()
    assert pairing.mean_random_pair_cost(student, teacher) == pytest.approx(off, rel=1e-10)


def test_the_teachers_own_pairing_scores_zero(teacher):
    stats = pairing.pairing_stats(teacher, teacher.copy())
    assert stats["pairing_ratio"] == 0 and stats["optimal"] == pytest.approx(0, abs=1e-9)
    assert stats["pairing_inefficiency"] == pytest.approx(0, abs=1e-9)


def test_a_random_re_pairing_scores_about_one(teacher):
    """The same set in a random order: the optimal matching recovers it (cost 0), the given pairing is
    as good as chance."""
    student = teacher[np.random.default_rng(2).permutation(len(teacher))]
    stats = pairing.pairing_stats(student, teacher)
    assert stats["pairing_ratio"] == pytest.approx(1, abs=0.1)
    assert stats["pairing_inefficiency"] == pytest.approx(1, abs=0.1)
    assert stats["optimal"] == pytest.approx(0, abs=1e-9)


def test_invariant_to_rescaling_and_shifting(teacher):
    student = teacher + 0.5 * np.random.default_rng(3).standard_normal(teacher.shape)
    a = pairing.pairing_stats(student, teacher, max_matching=100)
    b = pairing.pairing_stats(7.0 * student + 3.0, 7.0 * teacher + 3.0, max_matching=100)
    for key in ("pairing_ratio", "pairing_inefficiency"):
        assert b[key] == pytest.approx(a[key], rel=1e-9)
    assert 0.05 < a["pairing_ratio"] < 0.5  # a noisy copy of the teacher's map: between the two references


def test_unequal_sets_are_refused(teacher):
    with pytest.raises(ValueError, match="paired sets"):
        pairing.pairing_stats(teacher[:10], teacher[:11])


def test_class_conditional_re_pairing_stays_within_the_class():
    """Two classes far apart: a student that keeps each sample's class but shuffles within it is a
    random re-pairing within the class (ratio and inefficiency about 1), where re-pairing across classes
    would count the class gap as pairing and call it near 0."""
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1], 100)
    teacher = rng.standard_normal((200, 16)) + 50.0 * labels[:, None]
    shuffled = np.concatenate([rng.permutation(100), 100 + rng.permutation(100)])
    student = teacher[shuffled]
    within = pairing.pairing_stats(student, teacher, labels=labels)
    across = pairing.pairing_stats(student, teacher)
    assert within["within_class"] and not across["within_class"]
    assert within["pairing_ratio"] == pytest.approx(1, abs=0.1) and within["pairing_inefficiency"] == pytest.approx(1, abs=0.1)
    assert across["pairing_ratio"] < 0.1



def test_within_class_terms_by_brute_force_with_uneven_classes_and_a_class_of_one():
    """Each sample's expected cost under a random re-pairing within its class, averaged over samples
    (classes weighted by size, not by their count of pairs); a class of one pair has no re-pairing and
    is left out of every term, so it cannot move the ratio."""
    rng = np.random.default_rng(6)
    labels = np.array([0] * 30 + [1] * 6 + [2])
    teacher = rng.standard_normal((37, 8)) + 10.0 * labels[:, None]
    student = teacher + 0.7 * rng.standard_normal(teacher.shape)
    stats = pairing.pairing_stats(student, teacher, labels=labels)
    cost = ((student[:, None] - teacher[None]) ** 2).sum(-1)
    kept = labels < 2
    per_sample = [cost[i, (labels == labels[i]) & (np.arange(37) != i)].mean() for i in np.flatnonzero(kept)]
    assert stats["random"] == pytest.approx(np.mean(per_sample), rel=1e-10)
    assert stats["matched"] == pytest.approx(np.diag(cost)[kept].mean(), rel=1e-10)
    assert stats["dropped_pairs"] == 1 and stats["dropped_pairs_matching"] == 1
    far = student.copy()
    far[-1] += 1e3  # the lone pair of class 2, far off: no effect
    assert pairing.pairing_stats(far, teacher, labels=labels)["pairing_ratio"] == pytest.approx(stats["pairing_ratio"])


def test_the_optimal_matching_never_sees_more_than_max_matching_pairs(teacher, monkeypatch):
    """The full set's terms are sums; only the first `max_matching` pairs are matched (an O(m^3) solve:
    the paper grid's sets hold 50,000)."""
    sizes = []
    real = pairing.optimal_matching_cost

    def spy(s, t):
        sizes.append(len(s))
        return real(s, t)

    monkeypatch.setattr(pairing, "optimal_matching_cost", spy)
    student = teacher + np.random.default_rng(7).standard_normal(teacher.shape)
    pairing.pairing_stats(student, teacher, max_matching=50)
    pairing.pairing_stats(student, teacher, max_matching=50, labels=np.repeat([0, 1, 2], 100))
    assert sizes and max(sizes) <= 50 and sum(sizes) == 100


def test_the_inefficiency_depends_on_the_number_of_pairs_matched(teacher):
    """Why every config fixes `max_matching`: the same noisy copy scores differently at k = 50 and 100."""
    student = teacher + 3.0 * np.random.default_rng(4).standard_normal(teacher.shape)
    small = pairing.pairing_stats(student, teacher, max_matching=50)
    large = pairing.pairing_stats(student, teacher, max_matching=100)
    assert small["n_matching"] == 50 and large["n_matching"] == 100
    assert abs(small["pairing_inefficiency"] - large["pairing_inefficiency"]) > 0.05  # 0.37 against 0.44

"""The attribution arithmetic against plain numpy on a planted table, and against known truth in a simulation."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_varaug.evaluation.attribution import attribute, bootstrap_indices, find_row

pytestmark = pytest.mark.unit

STRUCTURES = ["organ", "lesion"]


def planted_table():
    """6 cases, 2 structures; the seed set has 4 replicas, order 3, mca 2 (different K: ddof matters in ratios)."""
    rng = np.random.default_rng(3)
    base = rng.uniform(500, 2000, size=(6, 2, 1))
    volumes = {"seed": base + rng.normal(0, 40, size=(6, 2, 4)),
               "order": base + rng.normal(0, 30, size=(6, 2, 3)),
               "mca": base + rng.normal(0, 5, size=(6, 2, 2))}
    volumes["seed"][2, 1] = 0.0  # the lesion absent from every seed replica of case 2: no CV there
    dice = {name: rng.uniform(0.6, 0.99, size=(6, 2)) for name in volumes}
    return volumes, dice


def plain(volumes, dice, source, s, cases=None):
    """The row's numbers with loops over cases and np.var / np.std, as the docs define them."""
    cases = range(volumes["seed"].shape[0]) if cases is None else cases
    var = [np.var(volumes[source][c, s], ddof=1) for c in cases]
    ref = [np.var(volumes["seed"][c, s], ddof=1) for c in cases]
    cv = [np.std(volumes[source][c, s], ddof=1) / np.mean(volumes[source][c, s]) for c in cases
          if np.mean(volumes[source][c, s]) > 0]
    return {"dice": np.mean([dice[source][c, s] for c in cases]), "cv": np.mean(cv), "var": np.mean(var),
            "ratio": np.mean(var) / np.mean(ref)}


def test_rows_match_plain_numpy_on_a_planted_table():
    volumes, dice = planted_table()
    rows, sums = attribute(volumes, dice, STRUCTURES, resamples=300, seed=5)
    assert [(r.structure, r.source) for r in rows] == [(st, so) for st in STRUCTURES for so in volumes]
    idx = bootstrap_indices(6, 300, 5)
    for s, structure in enumerate(STRUCTURES):
        for source in volumes:
            row, want = find_row(rows, structure, source), plain(volumes, dice, source, s)
            assert row.replicas == volumes[source].shape[2] and row.cases == 6
            assert row.mean_pairwise_dice == pytest.approx(want["dice"], rel=1e-12)
            assert row.volume_cv == pytest.approx(want["cv"], rel=1e-12)
            assert row.volume_variance == pytest.approx(want["var"], rel=1e-12)
            assert row.variance_ratio == pytest.approx(want["ratio"], rel=1e-12)
            boot = [plain(volumes, dice, source, s, cases)["ratio"] for cases in idx]
            assert row.ratio_interval == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])), rel=1e-12)
            assert row.ratio_interval[0] <= row.variance_ratio <= row.ratio_interval[1] or source == "seed"
        total = sum(plain(volumes, dice, so, s)["ratio"] for so in ("order", "mca"))
        add = next(a for a in sums if a.structure == structure)
        assert add.sources == ("order", "mca") and add.ratio_sum == pytest.approx(total, rel=1e-12)
    seed = find_row(rows, "organ", "seed")
    assert seed.variance_ratio == 1.0 and seed.ratio_interval == (1.0, 1.0)


def test_known_truth_is_recovered_in_a_simulation():
    """Replica volumes = case volume + noise of known spread per source: the ratios estimate sigma_src^2 /
    sigma_seed^2, inside their intervals; independent sources add up."""
    rng = np.random.default_rng(11)
    cases, k = 400, 5
    base = rng.uniform(1000, 3000, size=(cases, 1, 1))
    sigma = {"init": 6.0, "order": 8.0, "mca": 1.0}
    seed_noise = sum(rng.normal(0, sd, size=(cases, 1, k)) for sd in sigma.values())  # all sources at once
    volumes = {"seed": base + seed_noise, **{n: base + rng.normal(0, sd, size=(cases, 1, k))
                                             for n, sd in sigma.items()}}
    dice = {n: np.full((cases, 1), 0.9) for n in volumes}
    rows, sums = attribute(volumes, dice, ["lesion"], resamples=500)
    total = sum(sd ** 2 for sd in sigma.values())
    for name, sd in sigma.items():
        row = find_row(rows, "lesion", name)
        assert row.ratio_interval[0] < sd ** 2 / total < row.ratio_interval[1], (name, row)
    assert sums[0].interval[0] < 1.0 < sums[0].interval[1]
    assert find_row(rows, "lesion", "mca").variance_ratio == pytest.approx(1 / 101, rel=0.35)


def test_bad_tables_are_refused():
    volumes, dice = planted_table()
    with pytest.raises(ValueError, match="needs the 'seed' replicas"):
        attribute({"order": volumes["order"]}, dice, STRUCTURES)
    with pytest.raises(ValueError, match="K >= 2"):
        attribute({**volumes, "init": volumes["seed"][:, :, :1]}, {**dice, "init": dice["seed"]}, STRUCTURES)
    with pytest.raises(ValueError, match="shape"):
        attribute({**volumes, "init": volumes["seed"][:4]}, {**dice, "init": dice["seed"][:4]}, STRUCTURES)

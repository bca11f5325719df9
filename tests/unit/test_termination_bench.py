"""The termination benchmark's pure parts (bench/termination_bench.py): the
feed cost measured on a small batch, and the figures from measurements."""
from bench.benchmarks import BENCHMARKS, PROFILES, TITLES
from bench.termination_bench import assemble, feed_cost


def test_it_is_registered_with_sizes_in_every_profile():
    assert "termination" in BENCHMARKS and TITLES["termination"].startswith("12.")
    for sizes in PROFILES.values():
        assert {"term_batches", "term_reps", "trial_n"} <= set(sizes)


def test_feed_cost_measures_both_and_checks(tmp_path):
    bare, ruled, checks = feed_cost(str(tmp_path), 2, 2)
    assert len(bare) == len(ruled) == len(checks) == 2
    assert all(x > 0 for x in bare + ruled + checks)


def test_figures_from_measurements():
    res = assemble([400.0, 420.0], [600.0, 640.0], [2000.0, 2100.0], [1.0, 1.2], [1.3, 1.5], 4)
    names = [f["figure"] for f in res["figures"]]
    assert len(names) == 4 and "trial -n 4" in names[3]
    delta = res["figures"][0]
    assert delta["compare"] == "delta" and delta["result"]["median"] == 210.0
    assert res["notes"] == ["trial: +75 ms a run (median)"]

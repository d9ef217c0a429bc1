"""Acceptance rules replayed on logged distances (calibration/shapeworld/rules.py): a rule keeps a candidate only
where its test distances drop significantly, and then reports that candidate's FD; otherwise naive's."""

from qsched_pack.calibration.shapeworld import rules as RU


def _rows(drop: bool):
    base = dict(family="flow", steps=4, seed=0)
    ident = [1.0, 1.1, 0.9, 1.2, 1.0, 1.05, 0.95, 1.1]
    fitted = [v * (0.5 if drop else 1.2) for v in ident]
    dist = {k: {"identity": ident, "fitted": fitted} for k in ("pixel", "lowpass8", "lowpass4", "stats")}
    return [dict(base, format="fp32", method="fp", fd_heldout=100.0),
            dict(base, format="w4a8", method="naive", fd_heldout=200.0),
            dict(base, format="w4a8", method="ptqd", fd_heldout=180.0),
            dict(base, format="w4a8", method="qsched-reference-iv-unchecked", fd_heldout=150.0, distances=dist)]


def test_a_rule_keeps_a_candidate_only_where_its_distance_drops():
    for drop, kept, fd in ((True, "iv", 150.0), (False, None, 200.0)):
        rows = _rows(drop)
        assert RU.choose(rows, ("flow", 4, 0, "w4a8"), RU.RULES["pixel (iv)"]) == kept
        (row,) = RU.rule_rows(rows, RU.RULES["pixel (iv)"], "rule", {0})
        assert row["fd_heldout"] == fd and row["kept"] == kept
        # without a test the candidate is always kept, whatever its distances say
        assert RU.choose(rows, ("flow", 4, 0, "w4a8"), RU.RULES["no test (iv)"]) == "iv"


def test_tally_counts_the_gap_closed_against_ptqd():
    result = {"rows": _rows(True), "config": {"families": ["flow"], "steps": [4], "formats": ["w4a8"]}}
    line = next(x for x in RU.tally(result, {0}) if x.startswith("| pixel (iv) |"))
    assert "| 50% (20%) |" in line  # (200 - 150) / (200 - 100) vs PTQD (200 - 180) / 100

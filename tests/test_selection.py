"""Stage selection: one criterion from schedule.select, the oracle tracked beside it, early stopping."""

import pytest

from ureid.config import CONFIG_DIR, ConfigError, load_config
from ureid.runtime.selection import Selection


def _schedule(*sets):
    return load_config(CONFIG_DIR / "buc_cpu.yaml", list(sets)).schedule


def test_criteria_and_their_direction():
    assert _schedule().select == "last" and _schedule().criterion() is None
    assert _schedule().objective == "label_free:lf_silhouette"
    assert load_config(CONFIG_DIR / "ssl_cpu.yaml").schedule.objective == "label_free:lf_snd"
    with pytest.raises(ConfigError, match="schedule.objective: 'last' cannot compare trials; allowed: validation, oracle_map, label_free"):
        _schedule("schedule.objective=last")
    assert _schedule("schedule.select=label_free:lf_davies_bouldin").criterion() == ("lf_davies_bouldin", False)
    assert _schedule("schedule.select=label_free:lf_silhouette").criterion() == ("lf_silhouette", True)
    assert _schedule("schedule.select=oracle_map").criterion() == ("mAP", True)
    with pytest.raises(ConfigError, match="schedule.select.*needs schedule.validation"):
        _schedule("schedule.select=validation")
    with pytest.raises(ConfigError, match="'label_free:mAP' is not a selection criterion; allowed: last"):
        _schedule("schedule.select=label_free:mAP")


def test_label_free_choice_and_the_oracle_are_tracked_apart():
    sel = Selection.from_schedule(_schedule("schedule.select=label_free:lf_davies_bouldin"))
    for stage, (db, m) in enumerate([(3.0, 0.10), (2.0, 0.30), (2.5, 0.20), (2.0, 0.25)]):
        assert sel.observe(stage, {"lf_davies_bouldin": db, "mAP": m}) is False
    assert sel.selected_stage == 1  # lower is better; the first of equals is kept
    assert sel.oracle_stage == 1
    sel.observe(4, {"lf_davies_bouldin": 2.2, "mAP": 0.5})
    assert (sel.selected_stage, sel.oracle_stage) == (1, 4)


def test_last_never_stops_and_patience_stops_on_the_criterion():
    last = Selection.from_schedule(_schedule("schedule.select=last", "schedule.patience=1"))
    assert not any(last.observe(s, {"mAP": 0.1}) for s in range(4)) and last.selected_stage == 3
    sel = Selection.from_schedule(_schedule("schedule.select=label_free:lf_silhouette", "schedule.patience=2"))
    stops = [sel.observe(s, {"lf_silhouette": v}) for s, v in enumerate([0.1, 0.3, 0.2, 0.25])]
    assert stops == [False, False, False, True] and sel.selected_stage == 1
    assert sel.oracle_stage == 3  # no mAP reported: the oracle falls back to the last stage

"""Early stopping of hopeless trials: checkpoints during fine-tuning and the stop rule."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from netshrink.deploy.stopping import MARGIN, MIN_CURVES, PRIOR_RISE, QUARTERS, Checkpoint, FineTuneMonitor, Recovery, StopRule, encode_curve
from netshrink.training import train


def data(count: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, 8, generator=generator)
    return TensorDataset(inputs, (inputs[:, 0] > 0).long())


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))


def test_checkpoints_see_every_epoch_and_the_quarters_asked_for_and_do_not_change_the_weights():
    plain, watched = model(), model()
    train(plain, data(), epochs=3, lr=1e-2, batch_size=8, seed=0)
    seen = []
    train(
        watched, data(), epochs=3, lr=1e-2, batch_size=8, seed=0,
        checkpoint=lambda m, done: seen.append((done, m.training)) or False, checkpoints_at=lambda epoch: list(QUARTERS) if epoch == 0 else [],
    )
    assert [done for done, _ in seen] == [0.25, 0.5, 0.75, 1.0, 2.0, 3.0]
    assert not any(training for _, training in seen)  # evaluated in eval mode
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values()):
        assert torch.equal(a, b)  # dropout draws from the global generator: the checkpoints must not move it


def test_a_checkpoint_that_says_stop_ends_training_there():
    seen = []
    history = train(model(), data(), epochs=5, lr=1e-2, batch_size=8, seed=0, checkpoint=lambda m, done: seen.append(done) or done >= 2, checkpoints_at=lambda e: [])
    assert seen == [1.0, 2.0] and len(history) == 2


def test_the_rule_stops_only_what_the_largest_recovery_seen_cannot_lift_to_min_accuracy():
    rule = StopRule(min_accuracy=0.9, recovery=((0.0, 1.0, 5), (0.25, 0.35, 5), (0.5, 0.15, 5)))
    assert rule.reason(Checkpoint(fraction=0.0, epochs=0, accuracy=0.01)) is None  # the grace: no decision before fine-tuning
    assert rule.reason(Checkpoint(fraction=0.25, epochs=0.75, accuracy=0.56)) is None  # 0.56 + 0.3 + 0.05 reaches 0.9
    reason = rule.reason(Checkpoint(fraction=0.25, epochs=0.75, accuracy=0.5))
    assert reason and "50.0%" in reason and "min_accuracy 90.0%" in reason
    assert rule.reason(Checkpoint(fraction=0.6, epochs=2, accuracy=0.74)) is not None  # the 0.5 entry holds from 0.5 on
    assert rule.reason(Checkpoint(fraction=1.0, epochs=3, accuracy=0.1)) is None  # finished: measured like any trial


def test_the_monitor_counts_fine_tuning_over_rounds_and_skips_what_follows_a_stop():
    scores = iter([0.9, 0.9, 0.9, 0.9, 0.9, 0.1])
    monitor = FineTuneMonitor(rounds=2, epochs=2, evaluate=lambda m: next(scores), rule=StopRule(min_accuracy=0.95, recovery=((0.0, 1.0, 5), (0.5, 0.0, 5))))
    assert monitor.before_fine_tuning(None) is False and monitor.curve[0].fraction == 0.0
    assert monitor.checkpoints_at(0) == list(QUARTERS) and monitor.checkpoints_at(1) == []  # 1 of 4 epochs: past the first quarter
    assert monitor(None, 1.0) is False and monitor.curve[-1].fraction == 0.25
    assert monitor(None, 2.0) is True  # half done at 0.9: no recovery is left to reach 0.95
    assert monitor.skip and monitor.stopped.fraction == 0.5 and "95.0%" in monitor.stop_reason



def test_the_rule_starts_from_the_conservative_prior_and_calibrates_on_the_searchs_own_curves():
    recovery = Recovery()
    assert all(rise == PRIOR_RISE and curves == 0 for _, rise, curves in recovery.table())
    prior = StopRule(min_accuracy=0.9, recovery=recovery.table())
    assert prior.reason(Checkpoint(fraction=0.3, epochs=1, accuracy=0.45)) is None
    assert prior.reason(Checkpoint(fraction=0.1, epochs=1, accuracy=0.1)) is None  # at chance: measured to climb 81 points from there
    assert "conservative prior" in StopRule(min_accuracy=1.0, recovery=((0.0, 0.5, 0),)).reason(Checkpoint(fraction=0.3, epochs=1, accuracy=0.1))
    # trials of this search that rose at most 8 points from a quarter of the way to their last checkpoint
    for trial in range(MIN_CURVES):
        recovery.add(f"t{trial}", [(0.0, 0.3), (0.25, 0.82 + 0.01 * trial), (0.5, 0.86), (1.0, 0.9)])
    table = dict((share, (rise, curves)) for share, rise, curves in recovery.table())
    assert table[0.25] == (pytest.approx(0.08 + MARGIN), MIN_CURVES)
    assert table[0.0][0] == pytest.approx(0.6 + MARGIN)  # from the start: the largest rise seen, 0.3 -> 0.9
    calibrated = StopRule(min_accuracy=0.9, recovery=recovery.table())
    reason = calibrated.reason(Checkpoint(fraction=0.3, epochs=1, accuracy=0.45))  # the prior let this one go on; the search's own curves do not
    assert reason and "this search's trials" in reason
    recovery.add("t0", [(0.0, 0.3), (0.25, 0.3), (1.0, 0.9)])  # a later report of a trial replaces its earlier curve
    assert dict((s, r) for s, r, _ in recovery.table())[0.25] == pytest.approx(0.6 + MARGIN)


def test_a_curve_travels_as_json_pairs():
    curve = [Checkpoint(fraction=0.0, epochs=0, accuracy=0.5), Checkpoint(fraction=0.25, epochs=0.75, accuracy=0.75)]
    assert encode_curve(curve) == "[[0.0, 0.5], [0.25, 0.75]]"

import pytest

from netshrink.stats import interval_metrics, wilson_interval


def test_wilson_interval_matches_the_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81 of 263 -> 0.2553 to 0.3662
    assert wilson_interval(81 / 263, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    # 0 of 10 and 10 of 10: bounded by 0 and 1, not a zero-width interval
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(1.0, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


def test_one_image_of_the_built_in_validation_split_is_well_inside_the_interval():
    low, high = wilson_interval(0.97, 360)
    assert high - low > 3 * (1 / 360)  # three images apart is not a difference one can claim
    assert interval_metrics("accuracy", 0.97, 360) == {"accuracy_ci_low": low, "accuracy_ci_high": high}


@pytest.mark.parametrize("accuracy, samples", [(1.2, 10), (-0.1, 10), (0.5, 0)])
def test_impossible_inputs_are_refused(accuracy, samples):
    with pytest.raises(ValueError):
        wilson_interval(accuracy, samples)

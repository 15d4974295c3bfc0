"""``recurrent-lens partition``'s report: the counts and the mixture decision it states, for each outcome of the
mixture fit (the command end to end is in test_erase.py, with the erase that follows it)."""

import math

import pandas as pd

from recurrent_lens.analysis import PartitionResult
from recurrent_lens.cli.partition import report

SETTINGS = dict(hook_name="blocks.1.mixer.hook_state", head=0, protocol="ours", statistic="median_cos_gmm",
                replace="update", tau=0.05)


def _result(delta_bic):
    rows = pd.DataFrame({"atom": [0, 3, 5], "n": [9, 4, 7], "median_cos": [0.9, 0.1, 0.8],
                         "label": ["register", "bundle", "register"]})
    return PartitionResult(rows, delta_bic=delta_bic, n_dead=13, settings=SETTINGS)


def test_report_states_the_counts_and_the_preferred_mixture():
    text = report(_result(-12.5))
    assert text.splitlines() == [
        "partition on blocks.1.mixer.hook_state head 0 (protocol ours, median_cos_gmm): each atom's alignment with "
        "the native update where it fires",
        "  alive 3, dead 13",
        "  registers 2, bundles 1 (register median cosine 0.85)",
        "  delta BIC -12.5 (two Gaussians preferred: registers are the higher-mean component)",
    ]


def test_report_falls_back_to_the_threshold_when_one_gaussian_wins_or_none_is_fitted():
    assert report(_result(3.0)).splitlines()[-1] == (
        "  delta BIC 3 (one Gaussian preferred: registers have a median cosine > tau = 0.05)")
    assert report(_result(math.nan)).splitlines()[-1] == (
        "  delta BIC nan (fewer than 4 alive atoms, no mixture fitted: registers have a median cosine > tau = 0.05)")

"""The paper's evaluation protocols (specs/WRITESAE.md §4) as architecture-agnostic functions.

Each takes a :class:`~recurrent_lens.HookedRecurrentModel`, usually an SAE, a ``hook_state`` name, a
head and tokens, works only through the shared hook vocabulary and the recurrent cache, and returns a
tidy result (``.to_pandas()``, ``.summary()``, readable ``repr``).

- :func:`substitution_test`: atom vs delete vs random substitution of the native update (§4(a)).
- :func:`logit_shift_prediction`: closed-form logit shift vs measurement, R² (§4(b)).
- :func:`erase_atom`, :func:`install`, :func:`install_during_generation`, :func:`target_direction` (§4(c)).
- :func:`partition_atoms`: register/bundle partition with a 1-D GMM and ΔBIC (§4(d)).
"""

from recurrent_lens.analysis._common import kl_divergence, wilcoxon_signed_rank, wilson_interval
from recurrent_lens.analysis.interventions import erase_atom, install, install_during_generation, target_direction
from recurrent_lens.analysis.logit_shift import logit_shift_prediction, output_jacobian
from recurrent_lens.analysis.partition import fit_gmm_1d, partition_atoms
from recurrent_lens.analysis.results import (
    InstallResult, InterventionResult, LogitShiftResult, PartitionResult, SubstitutionResult,
)
from recurrent_lens.analysis.substitution import find_firings, substitution_test

__all__ = [
    "substitution_test", "find_firings", "logit_shift_prediction", "output_jacobian", "erase_atom", "install",
    "install_during_generation", "target_direction", "partition_atoms", "fit_gmm_1d", "kl_divergence",
    "wilson_interval", "wilcoxon_signed_rank", "SubstitutionResult", "LogitShiftResult", "InterventionResult",
    "InstallResult", "PartitionResult",
]

"""The paper's evaluation protocols as architecture-agnostic functions.

Each takes a :class:`~recurrent_lens.HookedRecurrentModel`, usually an SAE, a ``hook_state`` name, a
head and tokens, works only through the shared hook vocabulary and the recurrent cache, and returns a
tidy result (``.to_pandas()``, ``.summary()``, readable ``repr``) whose ``settings`` record every option.

Every analysis takes ``protocol="ours"`` (the default) or ``protocol="paper"``, which sets each option
to the choice of the paper (Young 2026, arXiv 2605.12770) or its reference repository; explicitly passed
options override the preset (:mod:`~recurrent_lens.analysis.protocols`, :func:`preset_table`). Each
analysis's options are declared once, by its options dataclass (:class:`SubstitutionOptions`, ...), which
its keyword arguments, the presets (:func:`presets`) and the ``recurrent-lens`` options follow.

- :func:`substitution_test`: atom vs delete vs random substitution of the native write (§3.2, App. J).
- :func:`logit_shift_prediction`: closed-form logit shift vs measurement, R² (Eq. 1, App. A).
- :func:`erase_atom`, :func:`install`, :func:`install_during_generation`, :func:`target_direction`,
  :func:`targets_by_rank` (§4, App. I.4-I.6).
- :func:`partition_atoms`: register/bundle partition with a 1-D GMM and ΔBIC (§3.1).
- :func:`feature_attribution`: a feature's pre-activation split exactly over the past writes that built its
  state (with :meth:`~recurrent_lens.HookedRecurrentModel.write_contributions` and ``implicit_attention``);
  :func:`plot_implicit_attention`, :func:`plot_top_writers` draw them.

What an analysis needs of its ``model`` and ``sae``: :class:`ModelLike` and :class:`SAELike`
(:mod:`~recurrent_lens.analysis.types`).

The examples of the analyses share a few objects, which the doctests get from the repository's root
``conftest.py``; to run an example by hand, build them first::

    import torch
    from recurrent_lens import HookedRecurrentModel, ModelConfig, toy
    from recurrent_lens.sae import WriteSAE

    toy_model, toy_task = toy.load("gdn")  # the trained toy Gated DeltaNet and its associative-recall task
    toy_sae = toy.load_sae("gdn")  # the demo's WriteSAE of its blocks.1 head 0 states
    tiny_cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=1, d_vocab=50, n_heads=2, d_k=8, d_v=8,
                           d_mlp=64)
    tiny_model = HookedRecurrentModel.from_config(tiny_cfg, seed=0).eval()  # random weights
    torch.manual_seed(0)
    tiny_sae = WriteSAE(8, 8, 16, k=2)  # random, on the tiny model's [8, 8] states
    tiny_tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
"""

from recurrent_lens.analysis._common import kl_divergence, wilcoxon_signed_rank, wilson_interval
from recurrent_lens.analysis.attribution import FeatureAttribution, feature_attribution
from recurrent_lens.analysis.interventions import (
    erase_atom, install, install_during_generation, out_proj_slice, target_direction, targets_by_rank,
)
from recurrent_lens.analysis.logit_shift import logit_shift_prediction, output_jacobian
from recurrent_lens.analysis.partition import fit_gmm_1d, partition_atoms
from recurrent_lens.analysis.plots import plot_implicit_attention, plot_top_writers, token_labels
from recurrent_lens.analysis.protocols import (
    OPTIONS, PRESET, PROTOCOLS, EraseOptions, EraseSettings, GenerationInstallOptions, GenerationInstallSettings,
    InstallOptions, InstallSettings, LogitShiftOptions, LogitShiftSettings, Options, PartitionOptions,
    PartitionSettings, Settings, SubstitutionOptions, SubstitutionSettings, preset, preset_table, presets,
)
from recurrent_lens.analysis.results import (
    InstallResult, InterventionResult, LogitShiftResult, PartitionResult, SubstitutionResult,
)
from recurrent_lens.analysis.substitution import find_firings, substitution_test
from recurrent_lens.analysis.types import ModelConfigLike, ModelLike, SAEConfigLike, SAELike

__all__ = [
    "feature_attribution", "FeatureAttribution", "plot_implicit_attention", "plot_top_writers", "token_labels",
    "substitution_test", "find_firings", "logit_shift_prediction", "output_jacobian", "erase_atom", "install",
    "install_during_generation", "target_direction", "targets_by_rank", "out_proj_slice", "partition_atoms",
    "fit_gmm_1d", "kl_divergence", "wilson_interval", "wilcoxon_signed_rank", "SubstitutionResult",
    "LogitShiftResult", "InterventionResult", "InstallResult", "PartitionResult", "PRESET", "PROTOCOLS", "preset",
    "preset_table", "presets", "OPTIONS", "Options", "SubstitutionOptions", "LogitShiftOptions", "InstallOptions",
    "GenerationInstallOptions", "PartitionOptions", "EraseOptions", "Settings", "SubstitutionSettings", "LogitShiftSettings", "InstallSettings",
    "GenerationInstallSettings", "PartitionSettings", "EraseSettings", "ModelLike", "SAELike", "ModelConfigLike",
    "SAEConfigLike",
]

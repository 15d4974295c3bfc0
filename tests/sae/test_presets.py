"""The four named SAEs: the parts each fixes or defaults to (the table of ``sae/presets.py``), their registration
by architecture name, and the refusal of a field a preset fixes."""

import pytest

from recurrent_lens.sae import SAE_REGISTRY, BilinearSAE, FlatSAE, MatrixSAE, SAEConfig, WriteSAE

TABLE = {  # preset: (architecture, encoder, decoder, rank) by default
    WriteSAE: ("write_sae", "bilinear", "factored", 1),
    FlatSAE: ("flat_sae", "linear", "flat", 1),
    MatrixSAE: ("matrix_sae", "linear", "factored", 1),
    BilinearSAE: ("bilinear_sae", "bilinear", "factored", 2),
}


@pytest.mark.parametrize("cls", list(TABLE), ids=lambda c: c.__name__)
def test_defaults_follow_the_table_and_the_class_is_registered(cls):
    cfg = cls(4, 3, 8).cfg
    assert (cls.architecture, cfg.encoder, cfg.decoder, cfg.rank, cfg.tied) == (*TABLE[cls], False)
    assert SAE_REGISTRY[cls.architecture] is cls


def test_free_fields_change_and_a_dense_bilinear_decoder_keeps_a_rank_1_encoder():
    assert MatrixSAE(4, 3, 8, rank="full").cfg.decoder == "full"
    assert MatrixSAE(4, 3, 8, rank=3).cfg.rank == 3
    assert BilinearSAE(4, 3, 8, decoder="flat").cfg.rank == 1
    assert BilinearSAE(4, 3, 8, decoder="flat", rank=2).cfg.rank == 2
    assert BilinearSAE(4, 3, 8, tied=True).cfg.tied
    assert WriteSAE(4, 3, 8, sparsity="gated").cfg.sparsity == "gated"


def test_fixed_fields_are_refused_by_name():
    with pytest.raises(ValueError, match="FlatSAE fixes decoder='flat'; got decoder='factored'"):
        FlatSAE(4, 3, 8, decoder="factored")
    with pytest.raises(ValueError, match="WriteSAE fixes rank=1; got rank=2"):
        WriteSAE(4, 3, 8, rank=2)
    with pytest.raises(ValueError, match="BilinearSAE fixes encoder='bilinear'; got encoder='linear'"):
        BilinearSAE(4, 3, 8, encoder="linear")
    with pytest.raises(ValueError, match="MatrixSAE has matrix atoms; use FlatSAE for decoder='flat'"):
        MatrixSAE(4, 3, 8, decoder="flat")
    with pytest.raises(ValueError, match="MatrixSAE needs encoder='linear', config has 'bilinear'"):
        MatrixSAE(cfg=SAEConfig(d_k=4, d_v=3, n_features=8))

"""``SAEConfig`` and ``SAEMetadata``: SAELens-style attribute access, the rank and decoder shorthands, the
sparsities' fields, the round trip through ``to_dict`` and the refusals."""

import copy
import pickle

import pytest

from recurrent_lens.sae import WriteSAE
from recurrent_lens.sae.config import SAEConfig, SAEMetadata

D_K, D_V, N_F = 4, 3, 16
D_IN = D_K * D_V


def test_cfg_d_sae_and_metadata_attribute_access():
    sae = WriteSAE(D_K, D_V, N_F, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 1})
    cfg = sae.cfg
    assert cfg.d_sae == N_F and cfg.d_in == D_IN
    assert isinstance(cfg.metadata, SAEMetadata) and isinstance(cfg.metadata, dict)
    assert cfg.metadata.hook_name == cfg.metadata["hook_name"] == "blocks.0.mixer.hook_state"
    assert cfg.metadata.hook_head_index == cfg.metadata.head == 1
    assert cfg.metadata.model_name is None and "model_name" not in cfg.metadata
    with pytest.raises(KeyError):
        cfg.metadata["model_name"]
    cfg.metadata.model_name = "tiny"
    cfg.metadata.hook_head_index = 0
    assert cfg.metadata == {"hook_name": "blocks.0.mixer.hook_state", "head": 0, "model_name": "tiny"}
    cfg.metadata = {"hook_name": "x"}
    assert isinstance(cfg.metadata, SAEMetadata) and cfg.metadata.hook_name == "x"
    with pytest.raises(TypeError, match="metadata: expected a dict, got list"):
        cfg.metadata = ["x"]
    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)).metadata.hook_name == "x"
    assert type(cfg.to_dict()["metadata"]) is dict
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg


def test_rank_and_decoder_shorthands():
    rank3 = SAEConfig(d_k=4, d_v=3, n_features=8, decoder=3)
    assert (rank3.decoder, rank3.rank) == ("factored", 3)
    full = SAEConfig(d_k=4, d_v=3, n_features=8, rank="full")
    assert (full.decoder, full.rank) == ("full", 1)


def test_sparsity_fields_are_keywords_attributes_and_flat_in_to_dict():
    cfg = SAEConfig(d_k=4, d_v=3, n_features=8, sparsity="jumprelu", l0_coef=0.25)
    assert cfg.l0_coef == 0.25 and cfg.k == 8  # k: every feature of a dictionary smaller than 32
    cfg.l0_coef = 0.5
    d = cfg.to_dict()
    assert d["l0_coef"] == 0.5 and "sparsity_options" not in d and list(d) == list(SAEConfig.flat_fields())
    assert SAEConfig.from_dict({**d, "architecture": "write_sae"}) == cfg
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cfg.nope


def test_metadata_private_names_are_refused():
    m = SAEMetadata(head=1)
    with pytest.raises(AttributeError, match="cannot set private attribute '_x'"):
        m._x = 1
    del m.hook_head_index  # the alias of head
    assert m == {}
    with pytest.raises(AttributeError):
        del m.head


@pytest.mark.parametrize("fields, message", [
    ({"encoder": "conv"}, r"encoder must be one of \('linear', 'bilinear'\), got 'conv'"),
    ({"decoder": "sparse"}, r"decoder must be one of \('flat', 'factored', 'full'\) or an int rank, got 'sparse'"),
    ({"rank": 0}, "rank must be a positive int or 'full', got 0"),
    ({"encoder": "linear", "tied": True}, "tied=True needs encoder='bilinear' and a factored decoder"),
    ({"n_features": 0}, "n_features must be >= 1, got 0"),
    ({"dead_threshold": -1}, "dead_threshold must be >= 0, got -1"),
    ({"sparsity_options": {"kk": 3}}, r"sparsity_options: unknown fields \['kk'\]"),
])
def test_bad_fields_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(**{"d_k": 4, "d_v": 3, "n_features": 8, **fields})

"""The SAE class registry: names to classes, duplicates refused."""

import pytest

from recurrent_lens.sae import SAE, SAE_REGISTRY, BilinearSAE, FlatSAE, MatrixSAE, WriteSAE, register_sae_class
from recurrent_lens.sae.registry import BASE_ARCHITECTURE


def test_the_sae_and_its_presets_are_registered_under_their_architecture():
    for cls in (SAE, WriteSAE, FlatSAE, MatrixSAE, BilinearSAE):
        assert SAE_REGISTRY[cls.architecture] is cls
    assert SAE.architecture == BASE_ARCHITECTURE


def test_register_sae_class_refuses_duplicates():
    class Custom(SAE):
        architecture = "custom_test_sae"

    register_sae_class("custom_test_sae", Custom)
    try:
        with pytest.raises(ValueError, match="'custom_test_sae' is already registered"):
            register_sae_class("custom_test_sae", Custom)
        register_sae_class("custom_test_sae", Custom, overwrite=True)
        assert SAE_REGISTRY["custom_test_sae"] is Custom
    finally:
        del SAE_REGISTRY["custom_test_sae"]

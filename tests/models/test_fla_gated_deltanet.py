"""fla's GatedDeltaNetForCausalLM (GVA) loaded through from_pretrained, against fla's own forward and
generate run on CPU with the torch patch of fla_cpu."""

import pytest
from tests.support.fla_cpu import patch_fla_for_cpu
from tests.support.tiny_arch_fla import (  # noqa: F401 (single_thread: autouse fixture)
    assert_greedy_generate_matches, assert_logits_match, fla_gated_deltanet, reference_and_loaded, single_thread,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    yield from reference_and_loaded(fla_gated_deltanet, tmp_path_factory, "fla_gdn", seed=1)


def test_config_reads_gva(models):
    _, model = models
    cfg = model.cfg
    assert (cfg.n_heads, cfg.n_key_heads, cfg.d_k, cfg.d_v) == (4, 2, 8, 12)
    assert cfg.options["layout"] == "fla"


def test_logits_match_fla(models):
    assert_logits_match(*models, 101)


@pytest.mark.parametrize("prompt_len", [9, 70], ids=["short-prompt", "chunked-prompt"])
def test_greedy_generate_matches_fla(models, prompt_len):
    assert_greedy_generate_matches(*models, prompt_len, 12)


def test_patch_nests_and_restores():
    import fla.layers.gated_deltanet as gdn
    from fla.modules import RMSNorm

    before = (gdn.chunk_gated_delta_rule, RMSNorm.forward)
    with patch_fla_for_cpu():
        patched = (gdn.chunk_gated_delta_rule, RMSNorm.forward)
        with patch_fla_for_cpu():
            assert (gdn.chunk_gated_delta_rule, RMSNorm.forward) == patched
        assert (gdn.chunk_gated_delta_rule, RMSNorm.forward) == patched
    assert (gdn.chunk_gated_delta_rule, RMSNorm.forward) == before

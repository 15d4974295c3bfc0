"""fla's GatedDeltaNetForCausalLM (GVA) loaded through from_pretrained, against fla's own forward and
generate run on CPU with the torch patch of fla_cpu."""

import pytest
import torch
from fla_cpu import patch_fla_for_cpu
from tiny_arch_fla import VOCAB, fla_gated_deltanet, single_thread  # noqa: F401 (autouse fixture)

from recurrent_lens import HookedRecurrentModel


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    with patch_fla_for_cpu():
        ref = fla_gated_deltanet(seed=1)
        path = tmp_path_factory.mktemp("fla_gdn")
        ref.save_pretrained(path)
        yield ref, HookedRecurrentModel.from_pretrained(path)


def test_config_reads_gva(models):
    _, model = models
    cfg = model.cfg
    assert (cfg.n_heads, cfg.n_key_heads, cfg.d_k, cfg.d_v) == (4, 2, 8, 12)
    assert cfg.options["layout"] == "fla"


def test_logits_match_fla(models):
    ref, model = models
    tokens = torch.randint(0, VOCAB, (2, 101))
    with torch.no_grad():
        expected = ref(tokens).logits
    assert (model(tokens) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("prompt_len", [9, 70], ids=["short-prompt", "chunked-prompt"])
def test_greedy_generate_matches_fla(models, prompt_len):
    ref, model = models
    prompt = torch.randint(0, VOCAB, (2, prompt_len))
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=12, do_sample=False)
    assert expected.shape == (2, prompt_len + 12)
    assert torch.equal(model.generate(prompt, max_new_tokens=12), expected)


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

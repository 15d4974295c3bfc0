"""The residual block's hook points and the unembeddings (untied, and tied to the embedding)."""

import torch
from tests.support.helpers import tiny_gdn

from recurrent_lens import HookedRecurrentModel, ModelConfig
from recurrent_lens.models.block import TiedUnembed, Unembed


def test_block_hooks_are_the_residual_stream_and_its_two_writes():
    model = tiny_gdn()
    _, cache = model.run_with_cache(torch.randint(0, 61, (2, 5)), names_filter=lambda n: n.startswith("blocks.1.h"))
    pre, mixer, mid, mlp, post = (cache[f"blocks.1.hook_{n}"] for n in ("resid_pre", "mixer_out", "resid_mid",
                                                                         "mlp_out", "resid_post"))
    torch.testing.assert_close(mid, pre + mixer, rtol=0, atol=0)
    torch.testing.assert_close(post, mid + mlp, rtol=0, atol=0)
    assert mlp.abs().max() > 0


def test_block_without_an_mlp_has_no_mlp_hook():
    model = tiny_gdn(d_mlp=0)
    assert model.blocks[0].mlp is None and not hasattr(model.blocks[0], "hook_mlp_out")
    _, cache = model.run_with_cache(torch.randint(0, 61, (1, 4)))
    assert not [name for name in cache.keys() if "mlp" in name]
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_mid"], rtol=0, atol=0)


def test_unembed_gives_fp32_logits_of_its_weight():
    cfg = ModelConfig(architecture="gated_deltanet", d_model=8, n_layers=1, d_vocab=11, n_heads=2, d_k=4, d_v=4)
    unembed = Unembed(cfg).to(torch.bfloat16)
    x = torch.randn(2, 3, 8)
    logits = unembed(x)
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, 11)
    torch.testing.assert_close(logits, (x.bfloat16() @ unembed.weight.T).float())


def test_tied_unembed_is_the_embedding_and_owns_no_parameter():
    cfg = ModelConfig(architecture="gated_deltanet", d_model=8, n_layers=1, d_vocab=11, n_heads=2, d_k=4, d_v=4,
                      tie_embeddings=True)
    model = HookedRecurrentModel.from_config(cfg, seed=0)
    assert isinstance(model.unembed, TiedUnembed) and model.unembed.weight is model.embed.weight
    assert not list(model.unembed.parameters()) and "unembed.weight" not in model.state_dict()
    with torch.no_grad():
        model.embed.weight[3] += 1.0
    x = torch.randn(1, 2, 8)
    torch.testing.assert_close(model.unembed(x), x @ model.embed.weight.T)

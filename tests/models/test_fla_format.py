"""What every fla checkpoint shares: the fused q/k/v rows, renamed and kept mixer keys, the block keys and the
config fields read the same way by every fla loader."""

import pytest
from tests.support.helpers import SIZES

from recurrent_lens import ModelConfig
from recurrent_lens.models import fla_format, gla


def test_fla_mixer_weight_maps_fused_qkv_rows_renames_and_kept_prefixes():
    cfg = ModelConfig(architecture="gla", **SIZES, options={"num_kv_heads": 2})
    qd, kd, vd = 4 * 16, 2 * 16, 2 * 16
    target = gla.map_fla_weight("model.layers.0.attn.v_proj.weight", cfg)
    assert (target.name, target.rows) == ("blocks.0.mixer.in_proj_qkv.weight", slice(qd + kd, qd + kd + vd))
    assert gla.map_fla_weight("model.layers.0.attn.gk_proj.1.bias", cfg).name == "blocks.0.mixer.gk_proj.1.bias"
    assert gla.map_fla_weight("model.layers.0.attn.g_norm.weight", cfg).name == "blocks.0.mixer.norm.weight"
    assert gla.map_fla_weight("model.layers.0.attn.unknown.weight", cfg) is None
    assert gla.map_fla_weight("model.layers.0.mlp_norm.weight", cfg).name == "blocks.0.ln2.weight"
    assert fla_format.fla_mixer_key("model.layers.12.mlp.gate_proj.weight") is None


def test_block_keys_follow_the_tied_or_untied_head():
    untied = ModelConfig(architecture="gla", **SIZES)
    tied = ModelConfig(architecture="gla", **SIZES, tie_embeddings=True)
    assert fla_format.fla_block_weight("model.embeddings.weight", untied).name == "embed.weight"
    assert fla_format.fla_block_weight("model.embed_tokens.weight", untied).name == "embed.weight"
    assert fla_format.fla_block_weight("model.norm.weight", untied).name == "ln_final.weight"
    assert fla_format.fla_block_weight("model.layers.3.attn_norm.weight", untied).name == "blocks.3.ln1.weight"
    assert fla_format.fla_block_weight("model.layers.3.mlp.down_proj.weight", untied).name == \
        "blocks.3.mlp.down_proj.weight"
    assert fla_format.fla_block_weight("lm_head.weight", untied).name == "unembed.weight"
    assert fla_format.fla_block_weight("lm_head.weight", tied) is None
    assert fla_format.fla_block_weight("model.layers.3.attn.o_proj.weight", untied) is None


def test_stack_config_and_its_refusals():
    d = {"hidden_size": 96, "num_hidden_layers": 2, "vocab_size": 50, "hidden_ratio": 2, "norm_eps": 1e-5}
    assert fla_format.fla_stack_config(d) == dict(d_model=96, n_layers=2, d_vocab=50, d_mlp=256, norm="rms",
                                                  norm_eps=1e-5, conv_kernel=4, tie_embeddings=False)
    assert fla_format.fla_mlp_width({**d, "intermediate_size": 100}) == 100
    with pytest.raises(ValueError, match="fla gla configs with hybrid 'attn' layers are not supported"):
        fla_format.refuse_hybrid({"attn": {"layers": [1]}}, "gla")
    fla_format.refuse_hybrid({"attn": None}, "gla")
    with pytest.raises(ValueError, match="config.json: hidden_size \\* expand_v = 96 must be an integer divisible by "
                                         "num_heads = 5"):
        fla_format.fla_head_dim(96, 5, "hidden_size * expand_v")

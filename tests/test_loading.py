"""from_pretrained: formats, sharding, dtype/device, streaming memory, and clear errors on bad checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import PEAK_RSS_SCRIPT, perturb_, tiny_qwen3_5
from safetensors.torch import load_file, save_file

from recurrent_lens import HookedRecurrentModel
from recurrent_lens.models.loading import CheckpointError


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    ref = tiny_qwen3_5(seed=1)
    path = tmp_path_factory.mktemp("qwen")
    ref.save_pretrained(path)
    return ref, path


def test_sharded_checkpoint_gives_identical_logits(qwen_dir, tmp_path):
    ref, path = qwen_dir
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    tokens = torch.randint(0, 97, (2, 19))
    a = HookedRecurrentModel.from_pretrained(path)(tokens)
    b = HookedRecurrentModel.from_pretrained(tmp_path)(tokens)
    assert torch.equal(a, b)


def test_hub_multimodal_layout_loads_text_part(tmp_path):
    """Hub checkpoints are Qwen3_5ForConditionalGeneration: text config nested, vision tower and MTP to skip."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    small = tiny_qwen3_5(seed=2)
    text = small.config.to_dict()
    cfg = Qwen3_5Config(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                        out_hidden_size=text["hidden_size"], patch_size=4, spatial_merge_size=1, temporal_patch_size=1),
                        tie_word_embeddings=True)
    torch.manual_seed(0)
    full = perturb_(Qwen3_5ForConditionalGeneration(cfg), 0.1).eval()
    full.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("model.visual.") for k in saved)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3_5"
    # an MTP head as in the hub files, which the model must skip
    saved["mtp.fc.weight"] = torch.zeros(4, 4)
    save_file(saved, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = HookedRecurrentModel.from_pretrained(tmp_path)
    tokens = torch.randint(0, 97, (1, 23))
    with torch.no_grad():
        expected = full(input_ids=tokens).logits
    assert (model(tokens) - expected).abs().max() < 1e-4


def test_dtype_is_honoured(qwen_dir):
    _, path = qwen_dir
    model = HookedRecurrentModel.from_pretrained(path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.cfg.dtype == "bfloat16"
    logits = model(torch.randint(0, 97, (1, 9)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'gpt2'.*supported"):
        HookedRecurrentModel.from_pretrained(tmp_path)


def test_missing_weights_file(qwen_dir, tmp_path):
    _, path = qwen_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights"):
        HookedRecurrentModel.from_pretrained(tmp_path)


def test_truncated_weights_file(qwen_dir, tmp_path):
    _, path = qwen_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        HookedRecurrentModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        HookedRecurrentModel.from_pretrained(tmp_path)


def test_missing_shard_and_missing_keys(qwen_dir, tmp_path):
    ref, path = qwen_dir
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        HookedRecurrentModel.from_pretrained(tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.linear_attn.A_log"]
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text((path / "config.json").read_text())
    save_file(weights, single / "model.safetensors")
    with pytest.raises(CheckpointError, match="unset.*blocks.1.mixer.A_log"):
        HookedRecurrentModel.from_pretrained(single)


def test_wrong_shape_in_checkpoint(qwen_dir, tmp_path):
    _, path = qwen_dir
    weights = load_file(path / "model.safetensors")
    weights["model.norm.weight"] = torch.zeros(3)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight.*expected shape \\(64,\\).*got \\(3,\\)"):
        HookedRecurrentModel.from_pretrained(tmp_path)


def test_token_ids_out_of_vocabulary(qwen_dir):
    _, path = qwen_dir
    model = HookedRecurrentModel.from_pretrained(path)
    with pytest.raises(ValueError, match=r"tokens: ids must lie in \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    # under the test suite's jaxtyping checks the annotation refuses it first (a TypeError); without them, our ValueError
    with pytest.raises((ValueError, TypeError), match="tokens: expected shape|input"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))





def test_streaming_load_peak_memory(tmp_path):
    """Peak resident memory while loading ~50 MB of weights stays under 1.3x their size
    (benchmarks/bench_models.py measures ~200 MB)."""
    from recurrent_lens import ModelConfig

    cfg = ModelConfig(architecture="gated_deltanet", d_model=512, n_layers=4, d_vocab=8000, n_heads=8, d_k=64,
                      d_v=64, d_mlp=1024, norm="rms_one_plus", tie_embeddings=True)
    model = HookedRecurrentModel.from_config(cfg)
    state = {_qwen_key(name): p for name, p in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(_qwen_config(cfg)))
    del model, state
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
    weights, peak = map(int, out.stdout.split())
    assert peak < 1.3 * weights, f"peak {peak / 2**20:.1f} MiB for {weights / 2**20:.1f} MiB of weights"


def _qwen_key(name):
    """Our parameter names back to transformers' qwen3_5_text names (the inverse of map_qwen3_5_weight)."""
    name = name.replace("blocks.", "model.layers.").replace(".mixer.", ".linear_attn.")
    name = name.replace(".ln1.", ".input_layernorm.").replace(".ln2.", ".post_attention_layernorm.")
    return {"embed.weight": "model.embed_tokens.weight", "ln_final.weight": "model.norm.weight"}.get(name, name)


def _qwen_config(cfg):
    return {
        "model_type": "qwen3_5_text", "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "vocab_size": cfg.d_vocab, "linear_num_value_heads": cfg.n_heads, "linear_num_key_heads": cfg.n_key_heads,
        "linear_key_head_dim": cfg.d_k, "linear_value_head_dim": cfg.d_v, "intermediate_size": cfg.d_mlp,
        "rms_norm_eps": 1e-6, "linear_conv_kernel_dim": 4, "tie_word_embeddings": True,
        "layer_types": ["linear_attention"] * cfg.n_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64,
    }

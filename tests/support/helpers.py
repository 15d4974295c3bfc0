"""Builders for tiny reference models and tiny recurrent_lens models shared by the tests."""

from __future__ import annotations

import textwrap

import torch

from recurrent_lens import HookedRecurrentModel, ModelConfig
from recurrent_lens.sae import BilinearSAE, FlatSAE, MatrixSAE, WriteSAE


def perturb_(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so that a random reference model is far from its symmetric init
    (zero-centred norms, identical gates) and a wrong weight mapping shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def patch_transformers_qwen3_5() -> None:
    """With fla installed, transformers binds its delta-rule names to fla's Triton kernels; use the torch ones."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as m

    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
        fn = getattr(m, name)
        setattr(m, name, getattr(fn, "__wrapped__", fn))


def tiny_qwen3_5(seed: int = 0, layer_types: tuple[str, ...] = ("linear_attention",) * 3 + ("full_attention",),
                 tie: bool = True):
    """A tiny random ``Qwen3_5ForCausalLM``: GVA (2 key heads → 4 value heads), partial rotary, one attention layer."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    patch_transformers_qwen3_5()
    cfg = Qwen3_5TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4,
        layer_types=list(layer_types), tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True},
    )
    torch.manual_seed(seed)
    return perturb_(Qwen3_5ForCausalLM(cfg), 0.1, seed).eval()


def word_tokenizer(words: list[str]):
    """A word-level fast tokenizer over ``words`` (which must include ``<unk>`` and ``<eos>``), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_gdn(seed: int = 0, n_layers: int = 2, **overrides) -> HookedRecurrentModel:
    """A tiny random recurrent_lens Gated DeltaNet (fla layout, GVA 2 → 4 heads)."""
    kw = dict(architecture="gated_deltanet", d_model=32, n_layers=n_layers, d_vocab=61, n_heads=4,
              n_key_heads=2, d_k=8, d_v=8, d_mlp=64, chunk_size=16, options={"layout": "fla"})
    kw.update(overrides)
    model = HookedRecurrentModel.from_config(ModelConfig(**kw), seed=seed)
    return slow_decay(perturb_(model, 0.1, seed), -4.5, -3.5).eval()


def _tiny_mamba2(seed: int) -> HookedRecurrentModel:
    from tests.support.tiny_arch_mamba2 import tiny_mamba2

    return slow_decay(tiny_mamba2(seed))


def slow_decay(model: HookedRecurrentModel, low: float = -4.0, high: float = -3.0) -> HookedRecurrentModel:
    """Small |A| so that an edit stays visible over a whole test sequence (models with an ``A_log``)."""
    with torch.no_grad():
        for layer in model.cfg.recurrent_layers:
            model.blocks[layer].mixer.A_log.uniform_(low, high)
    return model


def _tiny_rwkv7(seed: int) -> HookedRecurrentModel:
    from tests.support.tiny_arch_rwkv7 import tiny_rwkv7

    return tiny_rwkv7(seed, n_layers=2)


def _tiny_fla(name: str):
    def build(seed: int) -> HookedRecurrentModel:
        from tests.support import tiny_arch_fla

        return getattr(tiny_arch_fla, f"tiny_{name}")(seed)

    return build


ARCHS = {
    "gated_deltanet": lambda seed: tiny_gdn(seed),
    "mamba2": _tiny_mamba2,
    "delta_net": _tiny_fla("delta_net"),
    "gla": _tiny_fla("gla"),
    "rwkv7": _tiny_rwkv7,
    "qwen3_5_hybrid": lambda seed: tiny_gdn(seed, n_layers=2, norm="rms_one_plus", options={"layout": "qwen3_5"},
                                            layer_types=("recurrent", "attention"), n_attn_heads=4, n_kv_heads=2,
                                            d_head_attn=8, rotary_dim=4, attn_output_gate=True),
}


def tiny_model(arch: str, seed: int = 0) -> HookedRecurrentModel:
    """A tiny perturbed model of any registered test architecture (used by the parametrised edit tests)."""
    return ARCHS[arch](seed)


def build(arch: str, seed: int = 0) -> HookedRecurrentModel:
    """:func:`tiny_model`, or for ``"gla_conv"`` the tiny GLA with its optional short convolution."""
    if arch == "gla_conv":
        from tests.support.tiny_arch_fla import tiny_gla

        return tiny_gla(seed, use_short_conv=True)
    return tiny_model(arch, seed)


BUILTINS = ("gated_deltanet", "delta_net", "gla", "mamba2", "rwkv7")
"""The architectures the package registers when it is imported."""
SIZES = dict(d_model=64, n_layers=1, d_vocab=10, n_heads=4, d_k=16, d_v=16)
"""Small ``ModelConfig`` sizes that every built-in architecture accepts."""


SAE_KINDS = {  # every kind, with biases, a mean and Gated's scale away from their neutral init
    "write": lambda d_k, d_v, meta: WriteSAE(d_k, d_v, 32, k=4, metadata=meta),
    "flat_gated": lambda d_k, d_v, meta: FlatSAE(d_k, d_v, 32, sparsity="gated", metadata=meta),
    "matrix_jumprelu": lambda d_k, d_v, meta: MatrixSAE(d_k, d_v, 32, sparsity="jumprelu", metadata=meta),
    "bilinear": lambda d_k, d_v, meta: BilinearSAE(d_k, d_v, 32, k=4, metadata=meta),
}


def make_sae(model, kind, hook="hook_state", head=1, seed=0):
    """A random SAE of ``kind`` on ``head`` of the last recurrent layer's ``hook``, its biases, mean and Gated's
    scale away from their neutral init (so that every term of an attribution is exercised)."""
    layer = model.cfg.recurrent_layers[-1]
    torch.manual_seed(seed)
    sae = SAE_KINDS[kind](model.cfg.d_k, model.cfg.d_v, {"hook_name": f"blocks.{layer}.mixer.{hook}", "head": head})
    with torch.no_grad():
        sae.mean.normal_()
        for name in ("b_enc", "b_mag", "r_mag"):
            if hasattr(sae, name):
                getattr(sae, name).normal_(0, 0.3)
    return sae



# Run in a fresh process: prints the loaded weights' bytes and the peak resident memory added by from_pretrained.
PEAK_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from recurrent_lens import HookedRecurrentModel
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    # warm-up: torch's one-time lazy initialisation (~140 MB) is not part of loading the weights
    from recurrent_lens.models.loading import read_config
    from pathlib import Path
    with torch.device("meta"):
        HookedRecurrentModel(read_config(Path(sys.argv[1]))[1])
    before = rss("VmRSS:")
    model = HookedRecurrentModel.from_pretrained(sys.argv[1], progress=False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(weights, rss("VmHWM:") - before)
""")

"""Tiny DeltaNet and GLA models: recurrent_lens builders (for tests parametrised over architectures) and
fla reference builders (for the equivalence tests; build those inside ``patch_fla_for_cpu()``)."""

from __future__ import annotations

import pytest
import torch
from tests.support.helpers import perturb_

from recurrent_lens import HookedRecurrentModel, ModelConfig

VOCAB = 61


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread for the module: on a loaded 2-core machine, tiny ops run up to 40x slower with
    two OpenMP threads spinning against other processes (measured: fla generate 5.7 s → 0.27 s).
    Autouse in every test module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_delta_net(seed: int = 0, n_layers: int = 2, **options) -> HookedRecurrentModel:
    """A tiny random recurrent_lens DeltaNet (4 heads, d_k = d_v = 8, short conv, β, no gate)."""
    cfg = ModelConfig(architecture="delta_net", d_model=32, n_layers=n_layers, d_vocab=VOCAB, n_heads=4, d_k=8,
                      d_v=8, d_mlp=64, chunk_size=16, options=options)
    return perturb_(HookedRecurrentModel.from_config(cfg, seed=seed), 0.1, seed).eval()


def tiny_gla(seed: int = 0, n_layers: int = 2, **options) -> HookedRecurrentModel:
    """A tiny random recurrent_lens GLA (4 query heads sharing 2 key/value heads, d_k = 8, d_v = 16)."""
    options = {"num_kv_heads": 2, **options}
    cfg = ModelConfig(architecture="gla", d_model=32, n_layers=n_layers, d_vocab=VOCAB, n_heads=4, d_k=8, d_v=16,
                      d_mlp=64, chunk_size=16, options=options)
    return perturb_(HookedRecurrentModel.from_config(cfg, seed=seed), 0.1, seed).eval()


def _fla_model(model_cls, config, seed: int):
    torch.manual_seed(seed)
    return perturb_(model_cls(config), 0.1, seed).eval()


def fla_delta_net(seed: int = 0, **overrides):
    """A tiny random fla ``DeltaNetForCausalLM`` (no end-of-sequence token, so greedy decoding never stops)."""
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    kw = dict(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB, num_heads=4, intermediate_size=48,
              eos_token_id=None, bos_token_id=None)
    return _fla_model(DeltaNetForCausalLM, DeltaNetConfig(**{**kw, **overrides}), seed)


def fla_gla(seed: int = 0, **overrides):
    """A tiny random fla ``GLAForCausalLM`` (no end-of-sequence token)."""
    from fla.models import GLAConfig, GLAForCausalLM

    kw = dict(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB, num_heads=4, intermediate_size=48,
              eos_token_id=None, bos_token_id=None)
    return _fla_model(GLAForCausalLM, GLAConfig(**{**kw, **overrides}), seed)


def fla_gated_deltanet(seed: int = 0, **overrides):
    """A tiny random fla ``GatedDeltaNetForCausalLM`` with GVA (2 key heads → 4 value heads)."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    kw = dict(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB, head_dim=8, num_heads=2, num_v_heads=4,
              expand_v=1.5, intermediate_size=48, eos_token_id=None, bos_token_id=None)
    return _fla_model(GatedDeltaNetForCausalLM, GatedDeltaNetConfig(**{**kw, **overrides}), seed)


def reference_and_loaded(build, tmp_path_factory, name: str, **kwargs):
    """Build an fla reference (under the CPU patch), save it, and load it back through ``from_pretrained``.
    A generator for module-scoped fixtures: the patch stays active while the tests use the reference."""
    from tests.support.fla_cpu import patch_fla_for_cpu

    with patch_fla_for_cpu():
        ref = build(**kwargs)
        path = tmp_path_factory.mktemp(name)
        ref.save_pretrained(path)
        yield ref, HookedRecurrentModel.from_pretrained(path)


def assert_logits_match(ref, model: HookedRecurrentModel, length: int) -> None:
    """Our logits within 1e-4 max-abs of the fla reference's at batch 2."""
    tokens = torch.randint(0, VOCAB, (2, length))
    with torch.no_grad():
        expected = ref(tokens).logits
    assert (model(tokens) - expected).abs().max() < 1e-4


def assert_greedy_generate_matches(ref, model: HookedRecurrentModel, prompt_len: int, new: int) -> None:
    """Greedy ``generate`` token for token against fla's (repaired by the CPU patch)."""
    prompt = torch.randint(0, VOCAB, (2, prompt_len))
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=new, do_sample=False)
    assert expected.shape == (2, prompt_len + new)
    assert torch.equal(model.generate(prompt, max_new_tokens=new, do_sample=False), expected)

"""The Shakespeare models that ship with the package: loading by name (offline), tokenizer, losses, and
logits against transformers' own forward on the shipped weights."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from tests.support.helpers import patch_transformers_qwen3_5

from recurrent_lens import HookedRecurrentModel, list_pretrained
from recurrent_lens.data import open_tokens
from recurrent_lens.models import loading
from recurrent_lens.models.loading import CheckpointError
from recurrent_lens.pretrained import excerpt, pretrained_path, text_loss

NAMES = ("shakespeare-gdn", "shakespeare-mamba2")


@pytest.fixture(scope="module")
def models():
    return {name: HookedRecurrentModel.from_pretrained(name) for name in NAMES}


@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to reach the hub fails the test."""
    monkeypatch.setattr(loading, "snapshot_download", lambda *a, **k: pytest.fail("tried to reach the hub"))


def test_list_pretrained_names_what_ships():
    assert list_pretrained() == list(NAMES)
    for name in NAMES:
        files = {p.name for p in pretrained_path(name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md"} <= files
        assert (pretrained_path(name) / "model.safetensors").stat().st_size <= 8_000_000


def test_loading_by_name_is_offline_fp32_and_has_a_tokenizer(models, no_hub):
    for name in NAMES:
        model = HookedRecurrentModel.from_pretrained(name)
        assert model.cfg.source == name and model.tokenizer is not None
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert models["shakespeare-gdn"].cfg.layer_types.count("attention") == 1
    assert HookedRecurrentModel.from_pretrained(NAMES[1], dtype="bfloat16").W_E.dtype == torch.bfloat16


def test_loading_by_name_with_hf_hub_offline_in_a_fresh_process():
    script = ("from recurrent_lens import HookedRecurrentModel\n"
              f"for name in {NAMES!r}:\n"
              "    m = HookedRecurrentModel.from_pretrained(name, progress=False)\n"
              "    ids = m.to_tokens('Good night, sweet prince', prepend_bos=False)[0]\n"
              "    print(m.cfg.architecture, m.to_string(ids))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["gated_deltanet Good night, sweet prince", "mamba2 Good night, sweet prince"]


def test_unknown_name_lists_the_shipped_models(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(loading, "snapshot_download", unreachable)
    with pytest.raises(CheckpointError, match="shakespeare-gdn, shakespeare-mamba2"):
        HookedRecurrentModel.from_pretrained("shakespeare-gru")


def test_a_local_directory_of_the_same_name_wins(tmp_path, monkeypatch, no_hub):
    shutil.copytree(pretrained_path("shakespeare-mamba2"), tmp_path / "shakespeare-gdn")
    monkeypatch.chdir(tmp_path)
    model = HookedRecurrentModel.from_pretrained("shakespeare-gdn")
    assert model.cfg.architecture == "mamba2"
    # a local checkpoint keeps the dtype its config.json records
    assert model.W_E.dtype == torch.float16


def test_tokenizer_round_trip_and_conventions(models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pretrained_path("shakespeare-gdn"))
    text = excerpt("milton")[:3000] + "  Unicode too: café, naïve — ‘quoted’\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == tok.eos_token_id and len(tok) == 4096
    assert tok.decode(ids, skip_special_tokens=True) == text
    model = models["shakespeare-gdn"]
    tokens = model.to_tokens(text)
    assert tokens[0, 0] == tok.bos_token_id and tokens[0, 1:].tolist() == ids[1:]
    assert model.to_string(model.to_tokens(text, prepend_bos=False)[0]) == text
    # the text-dataset pipeline reads the same tokenizer: windows start with BOS
    path = tmp_path / "docs.txt"
    path.write_text(excerpt("plays").replace("\n\n", "\n"))
    window = next(iter(open_tokens(path, tokenizer=tok, context_length=64)))
    assert window[0] == tok.bos_token_id and window.shape == (64,)


@pytest.mark.parametrize("name", NAMES)
def test_losses_on_the_shipped_excerpts(models, name):
    """The goals, on the shipped excerpts: the held-out play at most 0.75 x its unigram entropy, Milton (never
    trained on; the opening of each of his four works) at most 0.85 x."""
    plays = text_loss(models[name], excerpt("plays"))
    milton = text_loss(models[name], excerpt("milton"))
    assert plays.n_tokens > 10_000 and milton.n_tokens > 10_000
    assert plays.loss <= 0.75 * plays.unigram
    assert milton.loss <= 0.85 * milton.unigram


def test_logits_match_transformers_on_the_shipped_weights(models):
    from transformers import Mamba2ForCausalLM, Qwen3_5ForCausalLM

    patch_transformers_qwen3_5()
    tokens = models["shakespeare-gdn"].to_tokens(excerpt("plays")[:3000])[:, :300]
    # fla registers its own "mamba2" with the Auto classes: name transformers' class explicitly
    for name, cls in zip(NAMES, (Qwen3_5ForCausalLM, Mamba2ForCausalLM)):
        ref = cls.from_pretrained(pretrained_path(name), dtype=torch.float32).eval()
        with torch.no_grad():
            expected = ref(tokens).logits
            got = models[name](tokens)
        assert (got - expected).abs().max() < 1e-4


SAE_NAME = "shakespeare-gdn/blocks.1.mixer.hook_state.h0"


def test_shipped_sae_loads_by_name_and_reconstructs_held_out_states(models, no_hub):
    from recurrent_lens.pretrained import list_pretrained_saes, pretrained_sae_path
    from recurrent_lens.sae import WriteSAE, load

    assert list_pretrained_saes() == [SAE_NAME]
    assert (pretrained_sae_path(SAE_NAME) / "sae_weights.safetensors").stat().st_size <= 4_000_000
    sae = WriteSAE.from_pretrained(SAE_NAME)
    assert type(load(SAE_NAME)) is WriteSAE and (sae.cfg.d_k, sae.cfg.d_v) == (32, 32)
    model = models["shakespeare-gdn"]
    _, cache = model.run_with_cache(model.to_tokens(excerpt("plays")[:4000]),
                                    names_filter="blocks.1.mixer.hook_state")
    states = cache["blocks.1.mixer.hook_state"][0, 1:, 0]  # the CLI never samples the BOS position
    with torch.no_grad():
        recon = sae.autoencode(states).reconstruction
    explained = 1 - (states - recon).pow(2).sum() / (states - states.mean(0)).pow(2).sum()
    assert explained > 0.45  # 0.505 on this excerpt of a play the model never saw; 0.536 on the CLI's held-out states


def test_unknown_sae_name_lists_the_shipped_ones():
    from recurrent_lens.sae import load

    with pytest.raises(FileNotFoundError, match="shakespeare-gdn/blocks.1.mixer.hook_state.h0"):
        load("shakespeare-gdn/blocks.2.mixer.hook_state.h0")

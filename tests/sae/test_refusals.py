"""Settings and files that would give wrong numbers are refused before any work, naming the argument or
file with the expected and the found value; a zero decoder row stays finite when rescaled."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from recurrent_lens.cli import main
from recurrent_lens.sae import FlatSAE, TrainConfig, WriteSAE, load
from recurrent_lens.sae.config import SAEConfig
from recurrent_lens.sae.training import check_train_config

D_K, D_V, N_F = 4, 3, 8
D_IN = D_K * D_V


def saelens_dir(path, weights=None, **cfg):
    """A hand-written SAELens TopK directory (no sae_lens needed)."""
    g = torch.Generator().manual_seed(0)
    weights = weights or {"W_enc": torch.randn(D_IN, N_F, generator=g), "b_enc": torch.randn(N_F, generator=g),
                          "W_dec": torch.randn(N_F, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    save_file(weights, str(path / "sae_weights.safetensors"))
    base = {"architecture": "topk", "d_in": D_IN, "d_sae": N_F, "k": 2, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.54.12", "recurrent_lens": {"d_k": D_K, "d_v": D_V}}}
    (path / "cfg.json").write_text(json.dumps({k: v for k, v in {**base, **cfg}.items() if v is not None}))
    return weights


def test_train_config_k_above_n_features_is_refused():
    with pytest.raises(ValueError, match="TrainConfig.k: expected at most n_features=16 .* got 64"):
        check_train_config(TrainConfig(n_features=16, k=64))
    with pytest.raises(ValueError, match="TrainConfig.k: expected at most n_features=16"):
        check_train_config(TrainConfig(n_features=16, k=17, sae_kwargs={"sparsity": "batchtopk"}))
    check_train_config(TrainConfig(n_features=16, k=16))
    check_train_config(TrainConfig(n_features=16, k=64, sae_kwargs={"sparsity": "jumprelu"}))  # k unused


def test_cli_k_above_n_features_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-sae", "--k", "64", "--n-features", "16", "--out", str(tmp_path), "--no-progress"])
    assert e.value.code == 2
    assert "argument --k: expected at most --n-features=16, got 64" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_saelens_k_above_d_sae_is_refused(tmp_path):
    saelens_dir(tmp_path, k=N_F + 1)
    with pytest.raises(ValueError, match=rf"cfg.json: k: expected at most d_sae={N_F} .* got {N_F + 1}"):
        load(str(tmp_path))


def test_saelens_cfg_without_d_sae_names_the_missing_field(tmp_path):
    saelens_dir(tmp_path, d_sae=None)
    with pytest.raises(ValueError, match="cfg.json: missing the required field 'd_sae' of a SAELens config"):
        load(str(tmp_path))


@pytest.mark.parametrize("metadata, field", [
    ({"sae_lens_version": "6.54.12", "recurrent_lens": "d_k=4"}, "metadata.recurrent_lens"),
    ("6.54.12", "metadata"),
])
def test_saelens_metadata_of_the_wrong_type_is_named(tmp_path, metadata, field):
    saelens_dir(tmp_path, metadata=metadata)
    with pytest.raises(ValueError, match=f"cfg.json: field '{field}': expected an object"):
        load(str(tmp_path))


@pytest.mark.parametrize("fmt", ["native", "saelens"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_tensor_and_file(tmp_path, fmt, value):
    WriteSAE(D_K, D_V, N_F, k=2).save_pretrained(str(tmp_path), format=fmt)
    path = tmp_path / "sae_weights.safetensors"
    tensors = load_file(str(path))
    name = "W_dec" if fmt == "saelens" else "V_dec"
    tensors[name].view(-1)[3] = value
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"sae_weights.safetensors: tensor '{name}': expected finite values"):
        load(str(tmp_path))


def test_minus_inf_log_threshold_still_loads(tmp_path):
    sae = FlatSAE(D_K, D_V, N_F, sparsity="jumprelu")
    with torch.no_grad():
        sae.log_threshold.fill_(-float("inf"))  # threshold 0, as a SAELens 'standard' SAE reads
    sae.save_pretrained(str(tmp_path))
    assert torch.equal(load(str(tmp_path)).log_threshold, sae.log_threshold)


def test_zero_decoder_row_stays_finite_when_rescaled(tmp_path):
    g = torch.Generator().manual_seed(1)
    weights = {"W_enc": torch.randn(D_IN, N_F, generator=g), "b_enc": torch.randn(N_F, generator=g),
               "W_dec": torch.randn(N_F, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    weights["W_dec"][5] = 0
    saelens_dir(tmp_path, weights, rescale_acts_by_decoder_norm=True)
    sae = load(str(tmp_path))
    assert all(bool(torch.isfinite(p).all()) for p in sae.state_dict().values() if p.is_floating_point())
    assert not sae.D_dec[5].any() and not sae.E_enc[5].any() and sae.b_enc[5] == 0
    x = torch.randn(6, D_IN, generator=g)
    norms = weights["W_dec"].norm(dim=-1)
    pre = (x @ weights["W_enc"] + weights["b_enc"]) * norms  # SAELens's ranking
    top = pre.topk(2, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    want = (codes / safe) @ weights["W_dec"] + weights["b_dec"]
    torch.testing.assert_close(sae.reconstruct(x.view(6, D_K, D_V)).flatten(1), want, rtol=1e-5, atol=1e-5)

    flat = FlatSAE(D_K, D_V, N_F, sparsity="jumprelu")
    with torch.no_grad():
        flat.D_dec[2] = 0
    flat.normalize_decoder()
    flat.fold_W_dec_norm()
    assert all(bool(torch.isfinite(p).all()) for p in flat.state_dict().values() if p.is_floating_point()
               and p is not flat.log_threshold)
    assert not flat.D_dec[2].any()


def test_sae_config_says_the_k_it_uses():
    assert SAEConfig(d_k=4, d_v=4, n_features=16).k == 16
    assert SAEConfig(d_k=4, d_v=4, n_features=64).k == 32
    with pytest.raises(ValueError, match=r"^k: expected at most n_features=16 active features for "
                                         r"sparsity='topk', got 64$"):
        SAEConfig(d_k=4, d_v=4, n_features=16, k=64)
    assert SAEConfig(d_k=4, d_v=4, n_features=16, k=64, sparsity="jumprelu").k == 64  # k unused there

"""SAELens interop: our SAEs written in SAELens's format and read by SAELens's own loader, SAELens
directories read back, and the SAELens-style attributes of our SAE.

Tests that need the ``sae_lens`` package skip when it is not installed, except when
``RECURRENT_LENS_REQUIRE_SAELENS=1`` (CI's second virtualenv), where a missing package fails.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tests.support.helpers import tiny_gdn
from tests.support.saelens import sae_lens
from recurrent_lens.sae import SAE, BilinearSAE, FlatSAE, MatrixSAE, WriteSAE, add_sae, load, reset_saes, saes
from recurrent_lens.sae.saelens import SAELENS_FORMAT_VERSION, load_saelens, to_saelens

D_K, D_V, N_F = 4, 3, 16
D_IN = D_K * D_V
TOL = dict(atol=1e-5, rtol=1e-5)


def randomised(sae: SAE, seed: int = 0) -> SAE:
    """Random parameters with non-zero biases and mean, non-unit atoms, and thresholds/gates that let
    roughly half the features through, so that every term of the conversion matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        if hasattr(sae, "log_threshold"):
            sae.log_threshold.copy_(torch.rand(N_F, generator=g, dtype=sae.log_threshold.dtype).mul(2).add(0.1).log())
        if hasattr(sae, "r_mag"):
            sae.r_mag.mul_(0.3)
        sae.mean.copy_(torch.randn(D_K, D_V, generator=g, dtype=sae.mean.dtype))
    return sae


META = {"hook_name": "blocks.1.mixer.hook_state", "head": 2, "model_name": "tiny"}

CASES = {
    "WriteSAE-topk": lambda: WriteSAE(D_K, D_V, N_F, k=3, center=True, metadata=dict(META)),
    "WriteSAE-jumprelu": lambda: WriteSAE(D_K, D_V, N_F, sparsity="jumprelu"),
    "WriteSAE-gated": lambda: WriteSAE(D_K, D_V, N_F, sparsity="gated", gate_mode="hard"),
    "FlatSAE-topk": lambda: FlatSAE(D_K, D_V, N_F, k=4, metadata=dict(META)),
    "FlatSAE-jumprelu-f64": lambda: FlatSAE(D_K, D_V, N_F, sparsity="jumprelu", dtype="float64"),
    "FlatSAE-gated": lambda: FlatSAE(D_K, D_V, N_F, sparsity="gated", gate_mode="hard"),
    "MatrixSAE-rank1-topk": lambda: MatrixSAE(D_K, D_V, N_F, k=5),
    "MatrixSAE-rank2-jumprelu": lambda: MatrixSAE(D_K, D_V, N_F, rank=2, sparsity="jumprelu"),
    "MatrixSAE-full-gated": lambda: MatrixSAE(D_K, D_V, N_F, rank="full", sparsity="gated", gate_mode="hard"),
    "BilinearSAE-rank2-topk": lambda: BilinearSAE(D_K, D_V, N_F, k=3),
    "BilinearSAE-flat-jumprelu": lambda: BilinearSAE(D_K, D_V, N_F, decoder="flat", sparsity="jumprelu"),
    "BilinearSAE-tied-topk-kall": lambda: BilinearSAE(D_K, D_V, N_F, tied=True, k=N_F),
    "BilinearSAE-tied-gated": lambda: BilinearSAE(D_K, D_V, N_F, tied=True, sparsity="gated", gate_mode="hard"),
}


def states(sae: SAE, n: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, D_K, D_V, generator=g, dtype=sae.cfg.torch_dtype)


# ----------------------------------------------------------------------- ours -> SAELens


@pytest.mark.parametrize("name", list(CASES))
def test_saelens_loader_reads_our_export(tmp_path, name):
    sl = sae_lens()
    ours = randomised(CASES[name]())
    ours.save_pretrained(str(tmp_path), format="saelens")
    theirs = sl.SAE.load_from_disk(str(tmp_path), device="cpu")

    expected_arch = {"topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}[ours.cfg.sparsity]
    assert theirs.cfg.architecture() == expected_arch
    assert (theirs.cfg.d_in, theirs.cfg.d_sae) == (D_IN, N_F)
    assert theirs.W_enc.dtype == ours.cfg.torch_dtype
    assert theirs.cfg.metadata.hook_name == ours.cfg.metadata.hook_name
    assert theirs.cfg.metadata.hook_head_index == ours.cfg.metadata.get("head")
    assert theirs.cfg.metadata.sae_lens_version == SAELENS_FORMAT_VERSION

    S = states(ours)
    codes = ours.encode(S)
    with torch.no_grad():
        their_codes = theirs.encode(S.flatten(-2))
        torch.testing.assert_close(their_codes, codes.detach(), **TOL)
        assert ((their_codes > 0) == (codes > 0)).all()
        torch.testing.assert_close(theirs.decode(codes), ours.decode(codes).flatten(-2), **TOL)
        torch.testing.assert_close(theirs(S.flatten(-2)), ours.reconstruct(S).flatten(-2), **TOL)
        dense = torch.rand(5, N_F, generator=torch.Generator().manual_seed(2), dtype=ours.cfg.torch_dtype)
        torch.testing.assert_close(theirs.decode(dense), ours.decode(dense).flatten(-2), **TOL)

    # ... and read back by us: same codes and reconstructions on the state.
    back = load(str(tmp_path))
    assert type(back) is FlatSAE and back.cfg.metadata.get("hook_name") == ours.cfg.metadata.get("hook_name")
    torch.testing.assert_close(back.encode(S), codes, **TOL)
    torch.testing.assert_close(back.reconstruct(S), ours.reconstruct(S), **TOL)


@pytest.mark.parametrize("name", ["WriteSAE-jumprelu", "MatrixSAE-full-gated", "FlatSAE-jumprelu-f64"])
def test_fold_W_dec_norm_matches_saelens(tmp_path, name):
    sl = sae_lens()
    ours = randomised(CASES[name]())
    ours.save_pretrained(str(tmp_path), format="saelens")
    theirs = sl.SAE.load_from_disk(str(tmp_path), device="cpu", fold_W_dec_norm=True)
    ours.fold_W_dec_norm()
    S = states(ours)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(S.flatten(-2)), ours.encode(S), **TOL)
        torch.testing.assert_close(theirs.W_dec, ours.decoder_atoms().flatten(1), **TOL)


# ----------------------------------------------------------------------- SAELens -> ours


def _saelens_sae(sl, architecture: str, **cfg):
    cls, cfg_cls = sl.registry.get_sae_class(architecture)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=N_F, **cfg))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(N_F, generator=g) * 2 - 0.2)  # some thresholds below zero
        if architecture == "gated":
            sae.r_mag.mul_(0.3)
    return sae


@pytest.mark.parametrize(
    "architecture, cfg",
    [
        ("standard", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("topk", {"k": 4}),
        ("topk", {"k": 4, "rescale_acts_by_decoder_norm": True}),
        ("jumprelu", {}),
        ("gated", {}),
    ],
    ids=["standard", "standard-no-b_dec-in", "topk", "topk-rescaled", "jumprelu", "gated"],
)
def test_we_read_saelens_directories(tmp_path, architecture, cfg):
    sl = sae_lens()
    theirs = _saelens_sae(sl, architecture, **cfg)
    theirs.cfg.metadata.hook_name = "blocks.0.mixer.hook_state"
    theirs.cfg.metadata.hook_head_index = 3
    theirs.save_model(str(tmp_path))
    with pytest.raises(ValueError, match="pass d_k= and d_v="):
        load(str(tmp_path))
    ours = load(str(tmp_path), d_k=D_K, d_v=D_V)
    assert type(ours) is FlatSAE and ours.cfg.metadata.hook_name == "blocks.0.mixer.hook_state"
    assert ours.cfg.metadata.hook_head_index == 3 == ours.cfg.metadata["head"]
    S = torch.randn(2, 6, D_K, D_V, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        codes = theirs.encode(S.flatten(-2))
        torch.testing.assert_close(ours.encode(S), codes, **TOL)
        torch.testing.assert_close(ours.decode(codes).flatten(-2), theirs.decode(codes), **TOL)
        torch.testing.assert_close(ours.reconstruct(S).flatten(-2), theirs(S.flatten(-2)), **TOL)


def test_pre_6_config_reads_like_saelens(tmp_path):
    sl = sae_lens()
    g = torch.Generator().manual_seed(5)
    weights = {"W_enc": torch.randn(D_IN, N_F, generator=g), "b_enc": torch.randn(N_F, generator=g),
               "W_dec": torch.randn(N_F, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    save_file(weights, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": N_F, "dtype": "float32", "device": "cpu", "hook_point": "blocks.0.mixer.hook_state",
        "hook_point_head_index": 1, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": True, "normalize_activations": False, "model_name": "m", "sae_lens_version": "3.5.0",
    }))
    theirs = sl.SAE.load_from_disk(str(tmp_path))
    ours = load(str(tmp_path), d_k=D_K, d_v=D_V)
    assert theirs.cfg.architecture() == "topk" and ours.cfg.k == 3 and ours.cfg.metadata.head == 1
    S = torch.randn(5, D_K, D_V, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(S), theirs.encode(S.flatten(-2)), **TOL)
        torch.testing.assert_close(ours.reconstruct(S).flatten(-2), theirs(S.flatten(-2)), **TOL)


def test_hand_written_standard_directory(tmp_path):
    """A SAELens 'standard' SAE written by hand, checked against its defining formula (no sae_lens needed)."""
    g = torch.Generator().manual_seed(6)
    W_enc, b_enc = torch.randn(D_IN, N_F, generator=g), torch.randn(N_F, generator=g)
    W_dec, b_dec = torch.randn(N_F, D_IN, generator=g), torch.randn(D_IN, generator=g)
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    save_file(weights, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": N_F, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.0.mixer.hook_write",
                        "hook_head_index": None}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load(str(tmp_path), d_k=D_K, d_v=D_V)
    x = torch.randn(9, D_IN, generator=g)
    codes = ((x - b_dec) @ W_enc + b_enc).relu()
    torch.testing.assert_close(sae.encode(x), codes, **TOL)
    torch.testing.assert_close(sae.encode(x.view(9, D_K, D_V)), codes, **TOL)
    torch.testing.assert_close(sae.decode(codes).flatten(-2), codes @ W_dec + b_dec, **TOL)
    assert "head" not in sae.cfg.metadata and sae.cfg.metadata.hook_name == "blocks.0.mixer.hook_write"

    with pytest.raises(ValueError, match=r"d_k \* d_v == d_in = 12"):
        load(str(tmp_path), d_k=5, d_v=3)
    for key, value, message in [
        ("normalize_activations", "layer_norm", "normalize_activations: expected 'none'"),
        ("architecture", "transcoder", "architecture: expected one of"),
        ("dtype", "int8", "dtype: expected one of"),
    ]:
        (tmp_path / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=message):
            load(str(tmp_path), d_k=D_K, d_v=D_V)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_sae": N_F + 1}))
    with pytest.raises(ValueError, match=r"W_enc: expected \(12, 17\), got \(12, 16\)"):
        load(str(tmp_path), d_k=D_K, d_v=D_V)


def test_export_errors_and_recorded_dims(tmp_path):
    with pytest.raises(ValueError, match="no inference SAE for sparsity='batchtopk'"):
        FlatSAE(D_K, D_V, N_F, sparsity="batchtopk").save_pretrained(str(tmp_path), format="saelens")
    with pytest.raises(ValueError, match="gate_mode='soft'"):
        WriteSAE(D_K, D_V, N_F, sparsity="gated").save_pretrained(str(tmp_path), format="saelens")
    with pytest.raises(ValueError, match="format: expected 'native' or 'saelens'"):
        WriteSAE(D_K, D_V, N_F).save_pretrained(str(tmp_path), format="sae_lens")
    assert not os.listdir(tmp_path)

    WriteSAE(D_K, D_V, N_F).save_pretrained(str(tmp_path), format="saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["metadata"]["recurrent_lens"]["d_k"] == D_K and cfg["metadata"]["sae_lens_training_version"] is None
    assert load_saelens(str(tmp_path), d_k=D_K, d_v=D_V).cfg.d_sae == N_F
    with pytest.raises(ValueError, match="records d_k=4, got d_k=3"):
        load(str(tmp_path), d_k=3, d_v=4)
    WriteSAE(D_K, D_V, N_F).save_pretrained(str(tmp_path / "native"))
    with pytest.raises(ValueError, match="d_v: .* has d_v=3, got d_v=4"):
        load(str(tmp_path / "native"), d_v=4)


def test_export_folds_centring_into_biases():
    sae = randomised(FlatSAE(D_K, D_V, N_F, k=5))
    cfg, w = to_saelens(sae)
    E = sae.E_enc.detach().reshape(N_F, -1)
    mean = sae.mean.reshape(-1)
    torch.testing.assert_close(w["W_enc"], E.T)
    torch.testing.assert_close(w["b_enc"], sae.b_enc.detach() - E @ mean)
    torch.testing.assert_close(w["b_dec"], (sae.b_dec.detach() + sae.mean).reshape(-1))
    assert cfg["apply_b_dec_to_input"] is False and cfg["k"] == sae.cfg.k


# ----------------------------------------------------------------------- SAELens-style attributes


def test_encode_accepts_flattened_input():
    sae = randomised(WriteSAE(D_K, D_V, N_F, k=3))
    S = states(sae)
    codes = sae.encode(S)
    assert torch.equal(sae.encode(S.flatten(-2)), codes)
    assert torch.equal(sae.encode(S[0, 0].flatten()), codes[0, 0])
    with pytest.raises(ValueError, match=r"S must have shape \[..., d_k=4, d_v=3\], got \(2, 11\)"):
        sae.encode(torch.randn(2, 11))
    # d_k = 1: a [1, d_v] tensor is the matrix itself, not a batch of one flattened state.
    row = FlatSAE(1, D_V, N_F)
    assert row.encode(torch.randn(1, D_V)).shape == (N_F,)
    assert row.encode(torch.randn(2, D_V)).shape == (2, N_F)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FlatSAE(D_K, D_V, N_F, sparsity="jumprelu"),
        lambda: WriteSAE(D_K, D_V, N_F, sparsity="jumprelu"),
        lambda: BilinearSAE(D_K, D_V, N_F, sparsity="gated", gate_mode="hard"),
        lambda: MatrixSAE(D_K, D_V, N_F, rank=2, sparsity="gated", gate_mode="hard"),
    ],
)
def test_fold_W_dec_norm_preserves_reconstruction(make):
    sae = randomised(make())
    S = states(sae)
    norms = sae.decoder_atoms().detach().flatten(1).norm(dim=-1)
    codes, recon = sae.encode(S).detach(), sae.reconstruct(S).detach()
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.decoder_atoms().detach().flatten(1).norm(dim=-1), torch.ones(N_F), **TOL)
    torch.testing.assert_close(sae.encode(S), codes * norms, **TOL)
    torch.testing.assert_close(sae.reconstruct(S), recon, **TOL)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: WriteSAE(D_K, D_V, N_F), "sparsity='topk'"),
        (lambda: FlatSAE(D_K, D_V, N_F, sparsity="batchtopk"), "sparsity='batchtopk'"),
        (lambda: WriteSAE(D_K, D_V, N_F, sparsity="gated"), "gate_mode='soft'"),
        (lambda: BilinearSAE(D_K, D_V, N_F, tied=True, sparsity="jumprelu"), "tied"),
    ],
)
def test_fold_W_dec_norm_refuses_what_it_would_change(make, message):
    sae = make()
    before = {name: t.clone() for name, t in sae.state_dict().items()}
    with pytest.raises(NotImplementedError, match=message):
        sae.fold_W_dec_norm()
    assert all(torch.equal(before[name], t) for name, t in sae.state_dict().items())


def test_use_error_term_attribute_is_add_sae_default():
    model = tiny_gdn(seed=0)
    hook = "blocks.1.mixer.hook_state"
    tokens = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(0))
    base = model(tokens)
    sae = WriteSAE(model.cfg.d_k, model.cfg.d_v, 32, k=4, use_error_term=True)
    assert sae.use_error_term is True and WriteSAE(D_K, D_V, N_F).use_error_term is False
    add_sae(model, sae, hook, 1)
    try:
        assert model.hook_dict[hook].use_error_term["h1"] is True
        assert (model(tokens) - base).abs().max() <= 1e-6
        add_sae(model, sae, hook, 1, use_error_term=False)  # an explicit argument wins
        assert (model(tokens) - base).abs().max() > 1e-4
    finally:
        reset_saes(model)
    sae.use_error_term = False
    with saes(model, [(sae, hook, 0)]):
        assert model.hook_dict[hook].use_error_term["h0"] is False
    with model.saes([(sae, hook, 0)], use_error_term=True):
        assert model.hook_dict[hook].use_error_term["h0"] is True

"""Save/load round trips, corrupt files, and the reference best.pt importer."""

import json
import os

import pytest
import torch

from recurrent_lens.sae import SAE, BilinearSAE, FlatSAE, MatrixSAE, WriteSAE, from_reference_checkpoint, load

D_K, D_V, N_F = 3, 2, 4


@pytest.mark.parametrize(
    "sae",
    [
        lambda: WriteSAE(D_K, D_V, N_F, k=2, center=True, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 1}),
        lambda: FlatSAE(D_K, D_V, N_F, sparsity="batchtopk"),
        lambda: MatrixSAE(D_K, D_V, N_F, rank=2, sparsity="jumprelu"),
        lambda: BilinearSAE(D_K, D_V, N_F, tied=True, sparsity="gated"),
        lambda: SAE(D_K, D_V, N_F, encoder="linear", decoder="full", dtype="float64"),
    ],
)
def test_save_load_bitwise(tmp_path, sae):
    sae = sae()
    with torch.no_grad():
        sae.mean.copy_(torch.randn(D_K, D_V))
        sae.steps_since_active.copy_(torch.arange(N_F))
    sae.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae_weights.safetensors"]
    loaded = load(str(tmp_path))
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    a, b = sae.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    S = torch.randn(5, D_K, D_V, dtype=sae.cfg.torch_dtype)
    assert torch.equal(sae.reconstruct(S), loaded.reconstruct(S))
    assert type(type(sae).from_pretrained(str(tmp_path))) is type(sae)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == sae.architecture


def test_truncated_and_mismatched_files_raise(tmp_path):
    sae = WriteSAE(D_K, D_V, N_F)
    sae.save_pretrained(str(tmp_path))
    weights = tmp_path / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load(str(tmp_path))
    weights.write_bytes(data)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["n_features"] = 8
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"V_enc: expected \(8, 1, 3\), got \(4, 1, 3\)"):
        load(str(tmp_path))
    (tmp_path / "cfg.json").write_text('{"architecture": "write_sae", "d_k"')
    with pytest.raises(ValueError, match="not valid JSON"):
        load(str(tmp_path))
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        load(str(tmp_path))


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    sae = WriteSAE(D_K, D_V, N_F)
    sae.save_pretrained(str(tmp_path))
    sae.save_pretrained(str(tmp_path))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def _factors(g, rank, legacy=False):
    def f(d):
        t = torch.nn.functional.normalize(torch.randn(N_F, rank, d, generator=g), dim=-1)
        return t[:, 0] if legacy else t

    return f


def reference_state(sae_type, rank=1, legacy=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = _factors(g, rank, legacy)
    d_in = D_K * D_V
    sd = {"steps_since_active": torch.zeros(N_F, dtype=torch.long)}
    if sae_type == "flat":
        sd.update({"encoder.weight": torch.randn(N_F, d_in, generator=g), "encoder.bias": torch.randn(N_F, generator=g),
                   "decoder.weight": torch.randn(d_in, N_F, generator=g), "decoder.bias": torch.randn(d_in, generator=g)})
    elif sae_type == "rank1":
        sd.update({"V": f(D_K), "W": f(D_V), "bias": torch.randn(D_K, D_V, generator=g),
                   "encoder.weight": torch.randn(N_F, d_in, generator=g), "encoder.bias": torch.randn(N_F, generator=g)})
    elif sae_type == "bilinear_flat":
        sd.update({"V_enc": f(D_K), "W_enc": f(D_V), "b_enc": torch.randn(N_F, generator=g),
                   "decoder.weight": torch.randn(d_in, N_F, generator=g), "decoder.bias": torch.randn(d_in, generator=g)})
    else:
        sd.update({"V_dec": f(D_K), "W_dec": f(D_V), "bias": torch.randn(D_K, D_V, generator=g)})
        if sae_type != "bilinear_tied":
            sd.update({"V_enc": f(D_K), "W_enc": f(D_V)})
        if sae_type == "gated":
            sd.update({"b_gate": torch.randn(N_F, generator=g), "r_mag": torch.randn(N_F, generator=g) * 0.1,
                       "b_mag": torch.randn(N_F, generator=g)})
        else:
            sd["b_enc"] = torch.randn(N_F, generator=g)
        if sae_type == "jumprelu":
            sd["log_threshold"] = torch.full((N_F,), -3.0)
    return sd


def reference_forward(sd, sae_type, S, k):
    """The reference SAE's forward pass written from the spec's formulas (TopK branch)."""
    x = S.reshape(len(S), -1)
    V = lambda n: sd[n] if sd[n].dim() == 3 else sd[n][:, None]  # noqa: E731
    if "encoder.weight" in sd:
        pre = x @ sd["encoder.weight"].T + sd["encoder.bias"]
    else:
        ve, we = ("V_dec", "W_dec") if sae_type == "bilinear_tied" else ("V_enc", "W_enc")
        pre = torch.einsum("irp,npq,irq->ni", V(ve), S, V(we)) + sd["b_enc"]
    v, i = pre.topk(k, dim=-1)
    a = torch.zeros_like(pre).scatter(1, i, v.relu())
    if "decoder.weight" in sd:
        return (a @ sd["decoder.weight"].T + sd["decoder.bias"]).view_as(S)
    Vd, Wd = ("V", "W") if sae_type == "rank1" else ("V_dec", "W_dec")
    return torch.einsum("ni,irp,irq->npq", a, V(Vd), V(Wd)) + sd["bias"]


@pytest.mark.parametrize(
    "sae_type,rank,expected,legacy,in_config",
    [
        ("bilinear", 1, WriteSAE, False, True),
        ("bilinear", 1, WriteSAE, True, False),
        ("bilinear", 2, BilinearSAE, False, True),
        ("bilinear_tied", 1, BilinearSAE, False, False),
        ("bilinear_flat", 1, BilinearSAE, False, False),
        ("rank1", 1, MatrixSAE, False, True),
        ("rank1", 1, MatrixSAE, False, False),
        ("flat", 1, FlatSAE, False, True),
        ("gated", 1, WriteSAE, False, False),
        ("jumprelu", 1, WriteSAE, False, False),
    ],
)
def test_reference_checkpoint_import(tmp_path, sae_type, rank, expected, legacy, in_config):
    sd = reference_state(sae_type, rank, legacy)
    config = {"layer": 9, "head": 4, "n_features": N_F, "d_k": D_K, "d_v": D_V, "d_in": D_K * D_V, "k": 2,
              "rank": rank, "use_batchtopk": False, "expansion_factor": 0}
    if in_config:
        config["sae_type"] = sae_type
    path = tmp_path / "best.pt"
    torch.save({"model_state_dict": sd, "config": config, "epoch": 3, "step": 48, "val_mse": 0.5}, path)
    sae = from_reference_checkpoint(str(path))
    assert type(sae) is expected
    assert sae.cfg.k == 2 and sae.cfg.rank == rank and sae.cfg.k_aux == 256 and sae.cfg.dead_threshold == 100
    assert sae.cfg.metadata["sae_type"] == sae_type and sae.cfg.metadata["step"] == 48
    assert torch.equal(sae.mean, torch.zeros(D_K, D_V))
    assert sae.cfg.tied == (sae_type == "bilinear_tied")
    if sae_type in ("gated", "jumprelu"):
        assert sae.cfg.sparsity == sae_type
        return
    S = torch.randn(6, D_K, D_V)
    torch.testing.assert_close(sae.reconstruct(S), reference_forward(sd, sae_type, S, 2), rtol=1e-5, atol=1e-5)


def test_reference_batchtopk_flag_and_bad_files(tmp_path):
    sd = reference_state("bilinear")
    path = tmp_path / "final.pt"
    torch.save({"model_state_dict": sd, "config": {"sae_type": "bilinear", "d_k": D_K, "d_v": D_V, "n_features": N_F,
                                                   "k": 2, "use_batchtopk": True}}, path)
    assert from_reference_checkpoint(str(path)).cfg.sparsity == "batchtopk"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        from_reference_checkpoint(str(path))
    sd["V_dec"] = sd["V_dec"][:, :, :2]
    torch.save({"model_state_dict": sd, "config": {"sae_type": "bilinear", "d_k": D_K, "d_v": D_V, "n_features": N_F}}, path)
    with pytest.raises(ValueError, match="V_dec: expected"):
        from_reference_checkpoint(str(path))
    torch.save({"weights": 1}, path)
    with pytest.raises(ValueError, match="no 'model_state_dict'"):
        from_reference_checkpoint(str(path))

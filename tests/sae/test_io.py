"""Save/load round trips, corrupt files, and the reference best.pt importer."""

import json
import os
import re

import pytest
import torch

from recurrent_lens.sae import (SAE, BilinearSAE, FlatSAE, MatrixSAE, SAEConfig, WriteSAE, from_reference_checkpoint,
                                load)

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


def _saved_cfg(tmp_path, sae=None):
    (sae or WriteSAE(D_K, D_V, N_F, k=2)).save_pretrained(str(tmp_path))
    return json.loads((tmp_path / "cfg.json").read_text())


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: [c], r"cfg.json: expected a JSON object, got list"),
        (lambda c: {**c, "k": "2"}, r"cfg.json: field 'k': expected an int or null, got '2' \(str\)"),
        (lambda c: {**c, "k": True}, r"cfg.json: field 'k': expected an int or null, got True \(bool\)"),
        (lambda c: {**c, "n_features": 4.0}, r"cfg.json: field 'n_features': expected an int, got 4.0"),
        (lambda c: {**c, "d_k": 0}, r"cfg.json: field 'd_k': expected a positive int, got 0"),
        (lambda c: {**c, "n_features": -4}, r"cfg.json: field 'n_features': expected a positive int, got -4"),
        (lambda c: {**c, "k_aux": -1}, r"cfg.json: field 'k_aux': expected a non-negative int, got -1"),
        (lambda c: {**c, "rank": 0}, r"cfg.json: field 'rank': expected a rank >= 1, got 0"),
        (lambda c: {**c, "rank": [1]}, r"cfg.json: field 'rank': expected an int or a string, got \[1\]"),
        (lambda c: {**c, "dtype": "float8"}, r"cfg.json: field 'dtype': expected one of \['float32'.*got 'float8'"),
        (lambda c: {**c, "dtype": 32}, r"cfg.json: field 'dtype': expected a string, got 32"),
        (lambda c: {**c, "architecture": "nope"}, r"cfg.json: unknown architecture 'nope'"),
        (lambda c: {**c, "architecture": ["write_sae"]}, r"cfg.json: unknown architecture \['write_sae'\]"),
        (lambda c: {k: v for k, v in c.items() if k != "d_v"}, r"cfg.json: missing required fields \['d_v'\]"),
        (lambda c: {**c, "sparsty": "topk"}, r"cfg.json: unknown fields \['sparsty'\]"),
        (lambda c: {**c, "center": "false"}, r"cfg.json: field 'center': expected true or false, got 'false'"),
        (lambda c: {**c, "metadata": [1]}, r"cfg.json: field 'metadata': expected an object, got \[1\]"),
        (lambda c: {**c, "aux_coef": float("nan")}, r"cfg.json: field 'aux_coef': expected a finite number, got nan"),
    ],
)
def test_malformed_cfg_json_is_refused_before_building(tmp_path, monkeypatch, edit, message):
    (tmp_path / "cfg.json").write_text(json.dumps(edit(_saved_cfg(tmp_path))))

    def never(*args, **kwargs):
        raise AssertionError("built an SAE from an invalid cfg.json")

    monkeypatch.setattr(SAEConfig, "from_dict", never)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + "/" + message):
        load(str(tmp_path))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: {**c, "encoder": "conv"}, r"cfg.json: encoder must be one of"),
        (lambda c: {**c, "rank": 2}, r"cfg.json: WriteSAE needs rank=1, config has 2"),
        (lambda c: {**c, "sparsity": "l1"}, r"cfg.json: sparsity must be one of"),
    ],
)
def test_cfg_json_values_the_config_refuses_name_the_file(tmp_path, edit, message):
    (tmp_path / "cfg.json").write_text(json.dumps(edit(_saved_cfg(tmp_path))))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + "/" + message):
        load(str(tmp_path))


def test_pickle_suggestion_only_for_a_refused_pickle(tmp_path):
    pack = tmp_path / "pack.pt"
    torch.save({"sae": torch.nn.Linear(2, 2)}, pack)
    with pytest.raises(ValueError, match=r"refuses, e.g. \['torch.nn.modules.linear.Linear'\].*allow_pickle=True"):
        from_reference_checkpoint(str(pack))
    data = pack.read_bytes()
    for name, content in [("truncated.pt", data[: len(data) // 2]), ("junk.pt", bytes(range(256)) * 3),
                          ("empty.pt", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="not a readable torch checkpoint \\(truncated or corrupt\\?\\)") as info:
            from_reference_checkpoint(str(tmp_path / name))
        assert "allow_pickle" not in str(info.value) and str(tmp_path / name) in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        from_reference_checkpoint(str(tmp_path / "truncated.pt"), allow_pickle=True)


def _reference_file(tmp_path, sd, config):
    path = tmp_path / "best.pt"
    torch.save({"model_state_dict": sd, "config": config}, path)
    return str(path)


BASE_CONFIG = {"d_k": D_K, "d_v": D_V, "n_features": N_F, "k": 2}


def test_reference_shapes_are_checked_before_reshaping(tmp_path):
    """A transposed encoder.weight ([d_in, n_f] = [6, 4]) holds as many numbers as the expected [4, 6]; it
    used to be reshaped into scrambled atoms."""
    sd = reference_state("flat")
    sd["encoder.weight"] = sd["encoder.weight"].T.contiguous()
    path = _reference_file(tmp_path, sd, {**BASE_CONFIG, "sae_type": "flat"})
    with pytest.raises(ValueError, match=re.escape(path) + r": encoder.weight: expected shape \(4, 6\), got \(6, 4\)"):
        from_reference_checkpoint(path)
    sd = reference_state("flat")
    sd["decoder.weight"] = sd["decoder.weight"][:, :3]
    path = _reference_file(tmp_path, sd, {**BASE_CONFIG, "sae_type": "flat"})
    with pytest.raises(ValueError, match=r"decoder.weight: expected shape \(6, 4\), got \(6, 3\)"):
        from_reference_checkpoint(path)
    sd = reference_state("bilinear")
    sd["bias"] = torch.zeros(D_V, D_K)
    path = _reference_file(tmp_path, sd, {**BASE_CONFIG, "sae_type": "bilinear"})
    with pytest.raises(ValueError, match=r"bias: expected shape \(3, 2\) or \(6,\), got \(2, 3\)"):
        from_reference_checkpoint(path)
    sd = reference_state("bilinear")
    sd["V_enc"] = torch.zeros(N_F * D_K)
    path = _reference_file(tmp_path, sd, {**BASE_CONFIG, "sae_type": "bilinear"})
    with pytest.raises(ValueError, match=r"V_enc: expected a factor of shape .* got \(12,\)"):
        from_reference_checkpoint(path)


def test_reference_n_features_that_nothing_gives(tmp_path):
    sd = reference_state("bilinear")
    del sd["b_enc"]
    path = _reference_file(tmp_path, sd, {"d_k": D_K, "d_v": D_V, "k": 2, "sae_type": "bilinear"})
    with pytest.raises(ValueError, match=re.escape(path) + r": config lacks n_features and the state dict has no 1-D "
                                                          r"b_enc, b_gate or encoder.bias"):
        from_reference_checkpoint(path)


@pytest.mark.parametrize(
    "config,message",
    [
        ({**BASE_CONFIG, "k": "2"}, r"config\['k'\]: expected a positive int, got '2'"),
        ({**BASE_CONFIG, "k": 2.5}, r"config\['k'\]: expected a positive int, got 2.5"),
        ({**BASE_CONFIG, "n_features": 0}, r"config\['n_features'\]: expected a positive int, got 0"),
        ({**BASE_CONFIG, "use_batchtopk": "False"}, r"config\['use_batchtopk'\]: expected True or False"),
        ({**BASE_CONFIG, "rank": 2}, r"config\['rank'\] is 2, the factors have rank 1"),
        ([1, 2], r"config: expected a dict, got list"),
    ],
)
def test_reference_config_values(tmp_path, config, message):
    path = _reference_file(tmp_path, reference_state("bilinear"), config)
    with pytest.raises(ValueError, match=re.escape(path) + ": " + message):
        from_reference_checkpoint(path)


def test_reference_state_dict_of_the_wrong_kind(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model_state_dict": [torch.zeros(2)], "config": BASE_CONFIG}, path)
    with pytest.raises(ValueError, match=r"model_state_dict: expected a dict of tensors, got list"):
        from_reference_checkpoint(str(path))
    torch.save({"model_state_dict": {**reference_state("bilinear"), "V_enc": [1.0]}, "config": BASE_CONFIG}, path)
    with pytest.raises(ValueError, match=r"model_state_dict: expected tensors under string keys, got other values "
                                         r"for \['V_enc'\]"):
        from_reference_checkpoint(str(path))
    sd = reference_state("rank1")
    del sd["W"]
    torch.save({"model_state_dict": sd, "config": {**BASE_CONFIG, "sae_type": "rank1"}}, path)
    with pytest.raises(ValueError, match=r"sae_type 'rank1' needs 'W'"):
        from_reference_checkpoint(str(path))

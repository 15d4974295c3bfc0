"""SAE maths against direct formulas on tiny hand-set cases (d_k=3, d_v=2, n_features=4); a pure forward; the
auxiliary loss and the encoder's chunks."""

import pytest
import torch

from recurrent_lens.sae import SAE, BilinearSAE, FlatSAE, MatrixSAE, WriteSAE
from recurrent_lens.sae.sparsities.topk import topk
from recurrent_lens.sae.training import evaluate, update_dead_counters

D_K, D_V, N_F = 3, 2, 4

PRESETS = {
    "write": (WriteSAE, {}),
    "flat": (FlatSAE, {}),
    "matrix_r1": (MatrixSAE, {}),
    "matrix_r2": (MatrixSAE, {"rank": 2}),
    "matrix_full": (MatrixSAE, {"rank": "full"}),
    "bilinear_r2": (BilinearSAE, {}),
    "bilinear_flat": (BilinearSAE, {"decoder": "flat"}),
    "bilinear_tied": (BilinearSAE, {"tied": True, "rank": 1}),
}


def build(name, **kw):
    cls, preset_kw = PRESETS[name]
    torch.manual_seed(0)
    sae = cls(D_K, D_V, N_F, **{**preset_kw, **kw})
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
        sae.mean.copy_(torch.randn(D_K, D_V))
    return sae


@torch.no_grad()
def direct_atoms_enc(sae):
    """Encoder matrices E_i written out element by element."""
    cfg = sae.cfg
    E = torch.zeros(N_F, D_K, D_V, dtype=torch.float64)
    for i in range(N_F):
        if cfg.encoder == "linear":
            E[i] = sae.E_enc[i].double()
        else:
            V, W = (sae.V_dec, sae.W_dec) if cfg.tied else (sae.V_enc, sae.W_enc)
            for r in range(cfg.rank):
                for p in range(D_K):
                    for q in range(D_V):
                        E[i, p, q] += float(V[i, r, p]) * float(W[i, r, q])
    return E


@torch.no_grad()
def direct_atoms_dec(sae):
    cfg = sae.cfg
    A = torch.zeros(N_F, D_K, D_V, dtype=torch.float64)
    for i in range(N_F):
        if cfg.decoder == "factored":
            for r in range(cfg.rank):
                for p in range(D_K):
                    for q in range(D_V):
                        A[i, p, q] += float(sae.V_dec[i, r, p]) * float(sae.W_dec[i, r, q])
        else:
            A[i] = sae.D_dec[i].double()
    return A


def direct_topk(pre, k):
    acts = torch.zeros_like(pre)
    for n in range(pre.shape[0]):
        order = sorted(range(pre.shape[1]), key=lambda i: -float(pre[n, i]))[:k]
        for i in order:
            acts[n, i] = max(0.0, float(pre[n, i]))
    return acts


@pytest.mark.parametrize("name", list(PRESETS))
def test_encode_decode_match_direct_formula(name):
    sae = build(name, k=2)
    S = torch.randn(5, D_K, D_V)
    E, A = direct_atoms_enc(sae), direct_atoms_dec(sae)
    x = (S - sae.mean).double()
    pre = torch.stack([torch.tensor([float((E[i] * x[n]).sum()) for i in range(N_F)]) for n in range(5)])
    pre = pre + sae.b_enc.detach().double()
    expected_acts = direct_topk(pre, 2)
    acts = sae.encode(S)
    torch.testing.assert_close(acts.double(), expected_acts, rtol=1e-5, atol=1e-5)
    expected_recon = torch.einsum("ni,ipq->npq", expected_acts, A) + sae.b_dec.double() + sae.mean.double()
    torch.testing.assert_close(sae.decode(acts).double(), expected_recon, rtol=1e-5, atol=1e-5)
    out = sae(S)
    torch.testing.assert_close(out.reconstruction.double(), expected_recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mse.double(), (expected_recon - S.double()).pow(2).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["write", "flat", "bilinear_r2"])
def test_leading_dims_and_single_matrix(name):
    sae = build(name, k=2)
    S = torch.randn(2, 3, D_K, D_V)
    assert sae.encode(S).shape == (2, 3, N_F)
    torch.testing.assert_close(sae.encode(S).reshape(6, N_F), sae.encode(S.reshape(6, D_K, D_V)))
    assert sae.reconstruct(S[0, 0]).shape == (D_K, D_V)


def test_jumprelu_sae_loss_has_l0_term():
    sae = WriteSAE(D_K, D_V, N_F, sparsity="jumprelu", l0_coef=0.5)
    S = torch.randn(6, D_K, D_V)
    out = sae(S)
    pre = sae._project((S - sae.mean).reshape(6, -1)) + sae.b_enc
    l0 = (pre > sae.log_threshold.exp()).float().sum(-1).mean()
    torch.testing.assert_close(out.aux_loss, 0.5 * l0)
    torch.testing.assert_close(out.loss, out.mse + out.aux_loss)


def test_gated_sae_aux_by_formula():
    sae = build("write", sparsity="gated", gated_sparsity_coef=0.3, gated_aux_coef=0.7)
    S = torch.randn(4, D_K, D_V)
    out = sae(S)
    x = (S - sae.mean).reshape(4, -1)
    shared = x @ torch.einsum("irp,irq->ipq", sae.V_enc, sae.W_enc).reshape(N_F, -1).T
    g = torch.sigmoid((shared + sae.b_gate) / 0.1)
    acts = g * (sae.r_mag.exp() * shared + sae.b_mag).relu()
    torch.testing.assert_close(out.acts, acts, rtol=1e-5, atol=1e-6)
    atoms = torch.einsum("irp,irq->ipq", sae.V_dec, sae.W_dec).reshape(N_F, -1)
    aux = 0.3 * g.sum(-1).mean() + 0.7 * ((g @ atoms + sae.b_dec.reshape(-1)) - x).pow(2).mean()
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["write", "flat", "matrix_r2", "matrix_full", "bilinear_r2", "bilinear_flat"])
def test_normalize_decoder_unit_norm(name):
    sae = build(name)
    sae.normalize_decoder()
    if sae.cfg.decoder == "factored":
        for t in (sae.V_dec, sae.W_dec):
            torch.testing.assert_close(t.norm(dim=-1), torch.ones(N_F, sae.cfg.rank))
    else:
        torch.testing.assert_close(sae.D_dec.flatten(1).norm(dim=-1), torch.ones(N_F))


@pytest.mark.parametrize("name", ["write", "matrix_r2", "flat", "bilinear_flat"])
def test_sparse_decode_equals_dense_outputs_and_grads(name):
    cls, kw = PRESETS[name]
    torch.manual_seed(1)
    sae = cls(6, 5, 40, **kw)
    n, k = 7, 5
    values = torch.randn(n, k).abs()
    indices = torch.stack([torch.randperm(40)[:k] for _ in range(n)])
    dense_acts = torch.zeros(n, 40).scatter(1, indices, values)
    g = torch.randn(n, 30)

    def grads(fn):
        sae.zero_grad()
        v = values.clone().requires_grad_(True)
        out = fn(v)
        (out * g).sum().backward()
        return out.detach(), v.grad, [p.grad.clone() for p in sae.parameters() if p.grad is not None]

    sparse = grads(lambda v: sae._sparse_decode(v, indices))
    dense = grads(lambda v: sae._dense_decode(torch.zeros(n, 40).scatter(1, indices, v)))
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(sparse[2], dense[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # BatchTopK's variable-length form agrees too.
    sample = torch.arange(n).repeat_interleave(k)
    seg = sae._segment_decode(values.reshape(-1), indices.reshape(-1), sample, n)
    torch.testing.assert_close(seg, sparse[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae._dense_decode(dense_acts), sparse[0], rtol=1e-5, atol=1e-6)


def test_forward_gradients_match_naive_reference():
    """The fast WriteSAE step (GEMM encoder + gather decoder) equals a dense einsum implementation."""
    torch.manual_seed(3)
    sae = WriteSAE(6, 5, 48, k=4)
    sae._chunk_elements = 7 * 30  # force several encoder chunks
    S = torch.randn(9, 6, 5)
    out = sae(S)
    out.mse.backward()
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    pre = torch.einsum("irp,npq,irq->ni", params["V_enc"], S, params["W_enc"]) + params["b_enc"]
    v, i = pre.topk(4, dim=-1)
    acts = torch.zeros_like(pre).scatter(1, i, v.relu())
    recon = torch.einsum("ni,irp,irq->npq", acts, params["V_dec"], params["W_dec"]) + params["b_dec"]
    mse = (recon - S).pow(2).mean()
    mse.backward()
    torch.testing.assert_close(out.mse, mse)
    for n, p in params.items():
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-5, atol=1e-7)


def test_dead_tracking_and_aux_loss_formula():
    sae = build("write", k=1, k_aux=2, dead_threshold=2)
    S = torch.randn(3, D_K, D_V)
    out = sae(S)
    assert float(out.aux_loss) == 0.0
    fired = (out.acts > 0).any(0)
    assert sae.steps_since_active.tolist() == [0, 0, 0, 0]  # forward is pure: the trainer keeps the counters
    update_dead_counters(sae, sae.autoencode(S))
    assert sae.steps_since_active.tolist() == [0 if f else 1 for f in fired.tolist()]
    sae.steps_since_active.copy_(torch.tensor([5, 0, 5, 5]))  # features 0, 2, 3 dead
    out = sae(S)
    dead = sae.steps_since_active >= 2
    assert int(out.n_dead) == int(dead.sum())
    x = (S - sae.mean).reshape(3, -1)
    pre = sae._project(x) + sae.b_enc
    masked = pre.masked_fill(~dead, float("-inf"))
    v, i = masked.topk(2, dim=-1)
    aux_acts = torch.zeros_like(pre).scatter(1, i, v.relu())
    atoms = torch.einsum("irp,irq->ipq", sae.V_dec, sae.W_dec).reshape(N_F, -1)
    x_hat = out.reconstruction.reshape(3, -1) - sae.mean.reshape(-1)
    aux = ((aux_acts @ atoms + sae.b_dec.reshape(-1)) - (x - x_hat)).pow(2).mean()
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, out.mse + out.aux_loss)


@pytest.mark.parametrize("name", ["write", "flat", "matrix_r2", "bilinear_flat", "bilinear_tied"])
def test_resample_dead_features(name):
    sae = build(name)
    sae.normalize_decoder()
    sae.steps_since_active.copy_(torch.tensor([0, 500, 0, 500]))
    batch = torch.randn(8, D_K, D_V)
    idx = sae.resample_dead_features(batch, generator=torch.Generator().manual_seed(0))
    assert idx.tolist() == [1, 3]
    assert sae.steps_since_active.tolist() == [0, 0, 0, 0]
    assert sae.b_enc[idx].abs().max() == 0
    if sae.cfg.decoder == "factored":
        torch.testing.assert_close(sae.V_dec[idx, 0].norm(dim=-1), torch.ones(2))
        # The atom is the top singular pair of one of the (centred) batch states.
        atom = torch.outer(sae.V_dec[1, 0], sae.W_dec[1, 0])
        X = batch - sae.mean
        cos = [abs(float((torch.outer(U[:, 0], Vh[0]) * atom).sum())) for U, _, Vh in map(torch.linalg.svd, X)]
        assert max(cos) == pytest.approx(1.0, abs=1e-5)
    else:
        torch.testing.assert_close(sae.D_dec[idx].flatten(1).norm(dim=-1), torch.ones(2))
    assert sae.resample_dead_features(batch).numel() == 0


def test_input_shape_errors_name_expected_and_actual():
    sae = WriteSAE(D_K, D_V, N_F)
    with pytest.raises(ValueError, match=r"d_k=3, d_v=2\], got \(5, 2, 3\)"):
        sae.encode(torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match="n_features=4"):
        sae.decode(torch.randn(5, 3))
    with pytest.raises(ValueError, match="fixes encoder"):
        WriteSAE(D_K, D_V, N_F, encoder="linear")
    with pytest.raises(ValueError, match="tied"):
        SAE(D_K, D_V, N_F, encoder="linear", tied=True)


def test_sae_hooks_visible_in_run_with_cache():
    sae = WriteSAE(D_K, D_V, N_F, k=2)
    _, cache = sae.run_with_cache(torch.randn(2, 5, D_K, D_V))
    shapes = {k: tuple(v.shape) for k, v in cache.items()}
    assert shapes == {
        "hook_sae_input": (2, 5, 3, 2),
        "hook_sae_acts_pre": (2, 5, 4),
        "hook_sae_acts_post": (2, 5, 4),
        "hook_sae_recons": (2, 5, 3, 2),
    }


def test_edited_acts_are_decoded_densely():
    sae = build("write", k=1)
    S = torch.randn(3, D_K, D_V)
    edited = {}

    def boost(acts, hook):
        acts = acts.clone()
        acts[:, 2] = 1.5
        edited["acts"] = acts
        return acts

    out = sae.run_with_hooks(S, fwd_hooks=[("hook_sae_acts_post", boost)])
    torch.testing.assert_close(out.reconstruction, sae.decode(edited["acts"]))


def test_config_dict_and_repr():
    sae = MatrixSAE(4, 4, 8, rank=2, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 3})
    d = sae.config_dict()
    assert d["architecture"] == "matrix_sae" and d["rank"] == 2 and d["decoder"] == "factored"
    assert "hook_name='blocks.0.mixer.hook_state'" in repr(sae) and "head=3" in repr(sae)


@pytest.mark.parametrize("kw", [{}, {"sparsity": "batchtopk"}, {"sparsity": "jumprelu"}, {"sparsity": "gated"}])
def test_forward_and_evaluation_never_touch_the_counters(kw):
    sae = WriteSAE(4, 3, 16, k=2, dead_threshold=3, **kw)
    sae.steps_since_active.copy_(torch.arange(16))
    S = torch.randn(6, 4, 3)
    for training in (True, False):
        sae.train(training)
        sae(S).loss.backward()
        sae.encode(S), sae.reconstruct(S), sae.splice(S, use_error_term=True)
        evaluate(sae, S, batch_size=4)
        assert sae.steps_since_active.tolist() == list(range(16))


def test_aux_loss_skipped_without_dead_and_limited_to_the_dead():
    """No dead feature: the auxiliary loss is an exact zero outside the graph. Fewer dead than k_aux:
    the same value as selecting k_aux with the alive ones masked (the reference's formula)."""
    torch.manual_seed(0)
    sae = WriteSAE(4, 3, 16, k=2, k_aux=6, dead_threshold=3)
    S = torch.randn(5, 4, 3)
    out = sae(S)
    assert out.aux_loss.item() == 0.0 and out.aux_loss.grad_fn is None and torch.equal(out.loss, out.mse)
    sae.steps_since_active[[2, 9]] = 3
    p = sae.autoencode(S)
    dead = sae.dead_mask()
    values, indices = topk(p.pre.masked_fill(~dead, float("-inf")), 6)
    aux_hat = torch.zeros(5, 16).scatter(1, indices, values) @ sae.decoder_atoms().reshape(16, -1) + sae.b_dec.reshape(-1)
    expected = (aux_hat - (p.x - p.x_hat)).pow(2).mean()
    torch.testing.assert_close(sae.losses(p).aux_loss, expected, rtol=1e-5, atol=1e-7)


def test_chunks_are_balanced_and_smaller_on_the_cpu():
    n = 16390
    sae = WriteSAE(128, 128, n, k=4)
    chunks = {}
    for device, limit in (("cpu", sae._cpu_chunk_elements), ("meta", sae._chunk_elements)):
        c = chunks[device] = sae._chunk(torch.device(device))
        sizes = [min(c, n - s) for s in range(0, n, c)]
        assert c * 128 * 128 <= limit and min(sizes) >= c // 2, (device, c, sizes[-1])
    assert chunks["cpu"] < chunks["meta"]

"""The SAE family as a composition of parts: same keys, init and outputs as before; pure forward."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import recurrent_lens
from recurrent_lens.sae import BilinearSAE, FlatSAE, MatrixSAE, WriteSAE, load
from recurrent_lens.sae import parts, sparsities
from recurrent_lens.sae.parts import FactoredMatmul as _FactoredMatmul

SHIPPED = Path(recurrent_lens.__file__).parent / "toy" / "weights" / "gdn_sae"

KEYS = {
    (WriteSAE, ()): ["V_enc", "W_enc", "V_dec", "W_dec", "b_enc", "b_dec"],
    (WriteSAE, (("sparsity", "jumprelu"),)): ["V_enc", "W_enc", "V_dec", "W_dec", "b_enc", "log_threshold", "b_dec"],
    (WriteSAE, (("sparsity", "gated"),)): ["V_enc", "W_enc", "V_dec", "W_dec", "b_gate", "r_mag", "b_mag", "b_dec"],
    (FlatSAE, ()): ["E_enc", "D_dec", "b_enc", "b_dec"],
    (FlatSAE, (("sparsity", "gated"),)): ["E_enc", "D_dec", "b_gate", "r_mag", "b_mag", "b_dec"],
    (MatrixSAE, (("rank", 2),)): ["E_enc", "V_dec", "W_dec", "b_enc", "b_dec"],
    (MatrixSAE, (("rank", "full"), ("sparsity", "jumprelu"))): ["E_enc", "D_dec", "b_enc", "log_threshold", "b_dec"],
    (BilinearSAE, (("decoder", "flat"),)): ["V_enc", "W_enc", "D_dec", "b_enc", "b_dec"],
    (BilinearSAE, (("tied", True),)): ["V_dec", "W_dec", "b_enc", "b_dec"],
}


@pytest.mark.parametrize("cls, kw", list(KEYS), ids=lambda v: getattr(v, "__name__", str(v)))
def test_state_dict_keys_and_order_unchanged(cls, kw):
    """State-dict keys (and their order, which is the optimizer's parameter order) are those of every
    SAE saved before the family was split into parts."""
    sae = cls(4, 3, 8, **dict(kw))
    assert list(sae.state_dict()) == KEYS[cls, kw] + ["mean", "steps_since_active"]
    assert [name for name, _ in sae.named_parameters()] == KEYS[cls, kw]


def test_parts_follow_the_config():
    sae = BilinearSAE(4, 3, 8, decoder="flat", sparsity="batchtopk")
    assert (type(sae.encoder), type(sae.decoder), type(sae.sparsity)) == (
        parts.BilinearEncoder, parts.FlatDecoder, sparsities.BatchTopK)
    sae = MatrixSAE(4, 3, 8, rank="full", sparsity="gated")
    assert (type(sae.encoder), type(sae.decoder), type(sae.sparsity)) == (
        parts.LinearEncoder, parts.FullDecoder, sparsities.Gated)
    assert list(sae.feature_parameters()) == ["E_enc", "D_dec", "b_gate", "r_mag", "b_mag"]
    assert list(BilinearSAE(4, 3, 8, tied=True, rank=1).feature_parameters()) == ["V_dec", "W_dec", "b_enc"]


def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def _uniform(fan_in, *shape):
    return torch.empty(*shape).uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


def test_init_draws_the_random_numbers_in_the_same_order():
    """A seed gives the same SAE as before: the reference's init, drawn parameter by parameter in
    registration order (written out here independently)."""
    n, d_k, d_v = 8, 4, 3
    torch.manual_seed(0)
    expected = {"V_enc": _unit(n, 1, d_k), "W_enc": _unit(n, 1, d_v), "V_dec": _unit(n, 1, d_k), "W_dec": _unit(n, 1, d_v)}
    for name in ("V_dec", "W_dec"):  # normalize_decoder runs once more at the end of the init
        expected[name] = F.normalize(expected[name], dim=-1)
    torch.manual_seed(0)
    sae = WriteSAE(d_k, d_v, n)
    for name, value in expected.items():
        assert torch.equal(getattr(sae, name), value), name
    assert not sae.b_enc.any() and not sae.b_dec.any()

    torch.manual_seed(1)
    E, D, b_enc, b_dec = _uniform(12, n, d_k, d_v), _uniform(n, n, d_k, d_v), _uniform(12, n), _uniform(n, d_k, d_v)
    D = F.normalize(D.reshape(n, -1), dim=-1).view(n, d_k, d_v)
    torch.manual_seed(1)
    sae = FlatSAE(d_k, d_v, n)
    for name, value in {"E_enc": E, "D_dec": D, "b_enc": b_enc, "b_dec": b_dec}.items():
        assert torch.equal(getattr(sae, name), value), name

    torch.manual_seed(2)
    E, V, W, b_enc = _uniform(12, n, d_k, d_v), _unit(n, 2, d_k), _unit(n, 2, d_v), _uniform(12, n)
    V, W = F.normalize(V, dim=-1), F.normalize(W, dim=-1)
    torch.manual_seed(2)
    sae = MatrixSAE(d_k, d_v, n, rank=2)
    for name, value in {"E_enc": E, "V_dec": V, "W_dec": W, "b_enc": b_enc}.items():
        assert torch.equal(getattr(sae, name), value), name


# Codes of the shipped toy SAE on fixed inputs, recorded with the code as it was before the family was
# split into parts (active features and their values, per sample).
SHIPPED_CODES = [
    ([45, 60, 216, 523, 789, 944, 1081, 1218, 1247, 1408, 1478, 1540, 1580, 1637, 1678, 1794],
     [1.22086692, 1.03256178, 1.06509268, 1.29596698, 1.27631199, 1.15841603, 1.77605772, 1.21308017, 1.21751118,
      1.0748018, 1.02566147, 1.79470599, 0.960830808, 0.960087359, 1.07111633, 1.0883199]),
    ([379, 647, 708, 814, 884, 1003, 1043, 1239, 1242, 1357, 1717, 1745, 1831, 1845, 1913, 1989],
     [1.49585354, 1.59970975, 1.79871416, 1.19362867, 1.48241532, 1.18136084, 1.4489485, 1.66772521, 1.33431637,
      1.15536058, 1.48291898, 1.47501183, 1.1721071, 1.54279256, 1.19191062, 1.36107898]),
    ([409, 683, 732, 775, 838, 954, 964, 991, 1019, 1119, 1187, 1289, 1507, 1526, 1845, 2045],
     [1.32515109, 1.16552615, 1.11254418, 1.47001076, 1.29746854, 2.02152967, 1.1989007, 1.04793441, 1.88134766,
      1.09502625, 1.21639025, 1.04678297, 1.07950568, 1.57384384, 1.12330747, 1.30747628]),
]
SHIPPED_RECON_SUMS = [18.1379089, 0.945907593, 14.1390543]
SHIPPED_RECON_SQ_SUMS = [44.1635857, 65.9293594, 49.8877182]


def test_shipped_toy_sae_loads_bit_identically_and_encodes_as_before():
    sae = load(str(SHIPPED))
    stored = load_file(str(SHIPPED / "sae_weights.safetensors"))
    state = sae.state_dict()
    assert sorted(state) == sorted(stored)
    for name, tensor in stored.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    S = sae.mean + 0.5 * torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    acts = sae.encode(S)
    for n, (idx, values) in enumerate(SHIPPED_CODES):
        assert acts[n].nonzero().squeeze(1).tolist() == idx
        torch.testing.assert_close(acts[n, idx], torch.tensor(values), rtol=1e-6, atol=1e-6)
    recon = sae.reconstruct(S).double().flatten(1)
    torch.testing.assert_close(recon.sum(1), torch.tensor(SHIPPED_RECON_SUMS, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon.pow(2).sum(1), torch.tensor(SHIPPED_RECON_SQ_SUMS, dtype=torch.float64), rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------------------------------- fast paths


def _sparse_rows_gradient(n, n_f, max_per_row, generator):
    """An incoming gradient like TopK's: a few non-zeros per row (some rows fewer, one row none)."""
    G = torch.zeros(n, n_f, dtype=torch.float64)
    for b in range(1, n):
        cols = torch.randperm(n_f, generator=generator)[: int(torch.randint(1, max_per_row + 1, (), generator=generator))]
        G[b, cols] = torch.randn(len(cols), dtype=torch.float64, generator=generator)
    return G


@pytest.mark.parametrize("rank", [1, 2])
def test_sparse_encoder_backward_equals_the_dense_one(rank, monkeypatch):
    g = torch.Generator().manual_seed(0)
    n, n_f, d_k, d_v = 6, 40, 4, 3
    X = torch.randn(n, d_k * d_v, dtype=torch.float64, generator=g)
    V = torch.randn(n_f, rank, d_k, dtype=torch.float64, generator=g)
    W = torch.randn(n_f, rank, d_v, dtype=torch.float64, generator=g)
    G = _sparse_rows_gradient(n, n_f, 4, g)
    assert parts.sparse_rows(G, parts.FactoredMatmul.sparse_fill) is not None

    def grads(fill):
        monkeypatch.setattr(parts.FactoredMatmul, "sparse_fill", fill)
        leaves = [t.clone().requires_grad_(True) for t in (X, V, W)]
        parts.FactoredMatmul.apply(*leaves, 7, True).backward(G)
        return [t.grad for t in leaves]

    for sparse, dense in zip(grads(1 / 8), grads(0.0)):
        torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    atoms = torch.einsum("irp,irq->ipq", V, W).reshape(n_f, -1)
    torch.testing.assert_close(grads(1 / 8)[0], G @ atoms)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_factored_matmul_gradcheck_dense_and_sparse_backward(fill, monkeypatch):
    """gradcheck's one-hot output gradients take the sparse path unless ``sparse_fill`` is 0."""
    monkeypatch.setattr(parts.FactoredMatmul, "sparse_fill", fill)
    g = torch.Generator().manual_seed(1)
    X, V, W = (torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(True)
               for shape in ((5, 12), (9, 2, 4), (9, 2, 3)))
    torch.autograd.gradcheck(lambda X, V, W: parts.FactoredMatmul.apply(X, V, W, 4, True), (X, V, W))


def test_sparse_rows_refuses_full_rows_and_pads_short_ones():
    G = torch.tensor([[0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    indices, values = parts.sparse_rows(G, 0.5)
    torch.testing.assert_close(torch.zeros_like(G).scatter_add(1, indices, values), G)
    assert indices.shape == (3, 2) and parts.sparse_rows(G, 0.25) is None


@pytest.mark.parametrize("rank", [1, 2])
def test_sparse_factored_decode_gradcheck(rank):
    g = torch.Generator().manual_seed(2)
    values = torch.randn(4, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    indices = torch.tensor([[0, 5, 2], [1, 1, 6], [3, 4, 5], [6, 0, 2]])  # a repeated feature in row 1
    V = torch.randn(7, rank, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    W = torch.randn(7, rank, 2, dtype=torch.float64, generator=g).requires_grad_(True)
    torch.autograd.gradcheck(lambda v, V, W: parts.SparseFactoredDecode.apply(v, indices, V, W), (values, V, W))
    out = parts.SparseFactoredDecode.apply(values, indices, V, W)
    dense = torch.zeros(4, 7, dtype=torch.float64).index_put((torch.arange(4)[:, None].expand(4, 3), indices), values,
                                                            accumulate=True)
    torch.testing.assert_close(out, dense @ torch.einsum("irp,irq->ipq", V, W).reshape(7, -1))


@pytest.mark.parametrize("n_dead", [0, 3])
def test_off_host_paths_give_the_same_step(n_dead, monkeypatch):
    """Off the CPU nothing may be counted on the host: the encoder backward is dense, the auxiliary
    loss is masked instead of skipped or shrunk, rows are summed with index_put_. Same step either way."""
    torch.manual_seed(0)
    sae = WriteSAE(4, 3, 24, k=2, k_aux=5, dead_threshold=3, rank=1)
    sae.steps_since_active[:n_dead] = 3
    S = torch.randn(9, 4, 3)

    def step():
        sae.zero_grad(set_to_none=True)
        out = sae(S)
        out.loss.backward()
        return [out.loss.detach()] + [p.grad.clone() for p in sae.parameters()]

    on_host = step()
    monkeypatch.setattr(parts, "on_host", lambda t: False)
    off_host = step()
    for a, b in zip(on_host, off_host):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("transpose", [True, False])
def test_chunked_factored_matmul_matches_einsum(transpose):
    torch.manual_seed(2)
    n_f, r, d_k, d_v, n = 11, 2, 4, 3, 6
    V = torch.randn(n_f, r, d_k, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n_f, r, d_v, dtype=torch.float64, requires_grad=True)
    X = torch.randn(n, d_k * d_v if transpose else n_f, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda X, V, W: _FactoredMatmul.apply(X, V, W, 4, transpose), (X, V, W))
    atoms = torch.einsum("irp,irq->ipq", V, W).reshape(n_f, -1)
    ref = X @ atoms.T if transpose else X @ atoms
    torch.testing.assert_close(_FactoredMatmul.apply(X, V, W, 4, transpose), ref)

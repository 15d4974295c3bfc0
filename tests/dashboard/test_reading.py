"""Reading a feature's atom: key and query tokens as mean cosines, promoted tokens through the head's output
Jacobian and the unembedding."""

import pytest
import torch
from tests.support.dashboard import HEAD

from recurrent_lens import HookedRecurrentModel, ModelConfig
from recurrent_lens.analysis.logit_shift import output_jacobian, unembedding
from recurrent_lens.dashboard import build_dashboard
from recurrent_lens.sae import FlatSAE
from recurrent_lens.states.cells import Cell


def test_key_and_query_tokens_are_mean_cosines(toy_setup, dash):
    model, sae, tokens = toy_setup
    names = ["blocks.1.mixer.hook_k", "blocks.1.mixer.hook_q"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    for hook, attr in zip(names, ("key_tokens", "query_tokens")):
        vecs = cache[hook][:, :, HEAD].reshape(-1, model.cfg.d_k)
        ids = tokens.reshape(-1)
        seen = ids.unique()
        means = torch.stack([vecs[ids == t].double().mean(0) for t in seen]).float()
        means = means / means.norm(dim=1, keepdim=True)
        for i in (0, 17, 1000):
            v = sae.V_dec[i, 0] / sae.V_dec[i, 0].norm()
            cos = means @ v
            top = cos.topk(len(dash[i].key_tokens))
            assert [c for _, c in getattr(dash[i], attr)] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-6)


def test_promoted_tokens_follow_the_head_output_and_unembedding():
    """A random Gated DeltaNet (gated output norm) and a FlatSAE: the value side is the atoms' leading right
    singular vector, read through the head's output Jacobian averaged over every position of the data."""
    cfg = ModelConfig(architecture="gated_deltanet", d_model=24, n_layers=1, d_vocab=30, n_heads=2, d_k=6, d_v=4,
                      d_mlp=32)
    model = HookedRecurrentModel.from_config(cfg, seed=1).eval()
    tokens = torch.randint(0, 30, (3, 10), generator=torch.Generator().manual_seed(0))
    sae = FlatSAE(6, 4, 5, k=2, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 1})
    d = build_dashboard(model, sae, tokens, progress=False)
    assert not any(hp._forward_hooks for hp in model.hook_dict.values())  # the early stop leaves no hook behind
    J = output_jacobian(model, tokens, Cell("blocks.0.mixer.hook_state", 1)).mean((0, 1))
    atoms = sae.decoder_atoms().detach()
    for i in range(5):
        U, S, Vh = torch.linalg.svd(atoms[i])
        w = Vh[0] / Vh[0].norm()
        logits = unembedding(model) @ (J @ w)
        # the SVD's sign is the dashboard's own too: both flip v and w together
        want = logits.topk(len(d[i].promoted_tokens))
        assert [t for t, _ in d[i].promoted_tokens] == [f"<{j}>" for j in want.indices.tolist()]
        assert [x for _, x in d[i].promoted_tokens] == pytest.approx(want.values.tolist(), rel=1e-4, abs=1e-5)
        assert d[i].rank1_share == pytest.approx(float(S[0] ** 2 / S.pow(2).sum()), rel=1e-5)

"""The sparsity registry: a new sparsity defined in one module (here, in this file) works end to end, with
its own config field, codes, native files and SAELens export, and nothing else edited."""

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from jaxtyping import Float

from tests.support.saelens import sae_lens
from recurrent_lens.sae import FlatSAE, SAEConfig, WriteSAE, load
from recurrent_lens.sae.io import check_cfg_dict
from recurrent_lens.sae.parts import Code
from recurrent_lens.sae.sparsities import JumpReLU, Sparsity, SparsityOptions, TopK, registry
from recurrent_lens.sae.sparsities.registry import get_sparsity, register_sparsity

D_K, D_V, N_F = 4, 3, 16
TOL = dict(atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the toy sparsity's module


@dataclass(frozen=True)
class ShiftedReLUOptions(SparsityOptions):
    toy_offset: float = 0.5
    """Subtracted from every pre-activation before the ReLU."""

    def check(self, cfg: Any) -> None:
        if self.toy_offset < 0:
            raise ValueError(f"toy_offset: expected a non-negative offset, got {self.toy_offset}")


class ShiftedReLU(Sparsity):
    """``relu(pre - toy_offset)``: SAELens's ReLU (``"standard"``) SAE with the offset in its bias."""

    kind = "toy_shifted_relu"
    Options = ShiftedReLUOptions
    saelens_architecture = "standard"
    feature_names = ("b_enc",)

    def build(self) -> None:
        self._new("b_enc", self.sae.encoder.bias_init())

    def activate(self, shared: torch.Tensor, lead: tuple[int, ...]) -> tuple[torch.Tensor, Code]:
        pre = self._hooked_pre(shared + self.sae.b_enc, lead)
        return pre, Code((pre - self.cfg.toy_offset).relu())

    def aux_loss(self, p: Any, dead: torch.Tensor) -> torch.Tensor:
        return p.x.new_zeros(())

    def to_saelens(self, shift: Float[torch.Tensor, " n_features"]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {"b_enc": self.sae.b_enc - shift - self.cfg.toy_offset}


@pytest.fixture
def toy(monkeypatch):
    """The toy sparsity registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_SPARSITIES", dict(registry._SPARSITIES))
    register_sparsity(ShiftedReLU)
    return ShiftedReLU


def randomised(sae):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        sae.mean.copy_(torch.randn(D_K, D_V, generator=g))
    return sae


def states(n=7):
    return torch.randn(2, n, D_K, D_V, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ end to end


def test_a_new_sparsity_works_end_to_end(toy, tmp_path):
    cfg = SAEConfig(d_k=D_K, d_v=D_V, n_features=N_F, sparsity=toy.kind, toy_offset=0.25)
    assert cfg.toy_offset == 0.25 and cfg.to_dict()["toy_offset"] == 0.25
    assert SAEConfig(d_k=D_K, d_v=D_V, n_features=N_F).toy_offset == 0.5  # every config carries the field
    with pytest.raises(ValueError, match=r"^toy_offset: expected a non-negative offset, got -1"):
        SAEConfig(d_k=D_K, d_v=D_V, n_features=N_F, sparsity=toy.kind, toy_offset=-1.0)

    sae = randomised(WriteSAE(D_K, D_V, N_F, sparsity=toy.kind, toy_offset=0.25))
    assert type(sae.sparsity) is toy and repr(sae).endswith("sparsity=toy_shifted_relu)")
    S = states()
    pre = ((S - sae.mean).flatten(-2) @ sae.encoder_atoms().flatten(1).T) + sae.b_enc
    codes = sae.encode(S)
    torch.testing.assert_close(codes, (pre - 0.25).relu(), **TOL)
    out = sae(S)
    out.loss.backward()
    assert float(out.aux_loss) == 0.0 and sae.b_enc.grad is not None

    native = tmp_path / "native"
    sae.save_pretrained(str(native))
    cfg_json = json.loads((native / "cfg.json").read_text())
    assert cfg_json["sparsity"] == toy.kind and cfg_json["toy_offset"] == 0.25
    with pytest.raises(ValueError, match=r"cfg.json: field 'toy_offset': expected a finite number, got 'x'"):
        check_cfg_dict({**cfg_json, "toy_offset": "x"}, "cfg.json")
    back = load(str(native))
    assert type(back) is WriteSAE and back.cfg == sae.cfg
    assert torch.equal(back.encode(S), codes)

    exported = tmp_path / "saelens"
    sae.save_pretrained(str(exported), format="saelens")
    saelens_cfg = json.loads((exported / "cfg.json").read_text())
    assert saelens_cfg["architecture"] == "standard"
    assert saelens_cfg["metadata"]["recurrent_lens"]["cfg"]["toy_offset"] == 0.25
    flat = load(str(exported))  # SAELens's ReLU SAE reads back as JumpReLU with threshold 0
    assert type(flat) is FlatSAE and flat.cfg.sparsity == JumpReLU.kind
    torch.testing.assert_close(flat.encode(S), codes, **TOL)
    torch.testing.assert_close(flat.reconstruct(S), sae.reconstruct(S), **TOL)


def test_a_new_sparsity_exports_what_saelens_reads(toy, tmp_path):
    sl = sae_lens()
    sae = randomised(WriteSAE(D_K, D_V, N_F, sparsity=toy.kind, toy_offset=0.25))
    sae.save_pretrained(str(tmp_path), format="saelens")
    theirs = sl.SAE.load_from_disk(str(tmp_path), device="cpu")
    S = states()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(S.flatten(-2)), sae.encode(S), **TOL)
        torch.testing.assert_close(theirs(S.flatten(-2)), sae.reconstruct(S).flatten(-2), **TOL)


def test_a_sparsity_without_saelens_equivalent_is_refused_by_name(toy, tmp_path):
    class Unexportable(ShiftedReLU):
        kind = "toy_unexportable"
        saelens_architecture = None

    register_sparsity(Unexportable)
    with pytest.raises(ValueError, match=r"no inference SAE for sparsity='toy_unexportable'\. Convertible sparsities: "
                                         r"\['topk', 'jumprelu', 'gated', 'toy_shifted_relu'\]"):
        WriteSAE(D_K, D_V, N_F, sparsity="toy_unexportable").save_pretrained(str(tmp_path), format="saelens")


# ------------------------------------------------------------------ names


def test_an_unknown_sparsity_lists_the_registered_ones(toy):
    expected = r"sparsity must be one of the registered sparsities \['batchtopk', 'gated', 'jumprelu', 'topk', " \
               r"'toy_shifted_relu'\], got 'l1'"
    with pytest.raises(ValueError, match=expected):
        get_sparsity("l1")
    with pytest.raises(ValueError, match=expected):
        SAEConfig(d_k=D_K, d_v=D_V, n_features=N_F, sparsity="l1")


def test_registration_refuses_clashes(toy):
    with pytest.raises(ValueError, match="sparsity 'toy_shifted_relu' is already registered"):
        register_sparsity(ShiftedReLU)

    @dataclass(frozen=True)
    class KOptions(SparsityOptions):
        k: int = 3

    class OwnK(TopK):
        kind = "toy_own_k"
        Options = KOptions
        saelens_reads = ()

    with pytest.raises(ValueError, match=r"config fields \['k'\] are already declared by sparsity 'topk'"):
        register_sparsity(OwnK)

    class AlsoReadsTopK(TopK):
        kind = "toy_reads_topk"

    with pytest.raises(ValueError, match=r"SAELens architectures \['topk'\] are already read as sparsity 'topk'"):
        register_sparsity(AlsoReadsTopK)
    assert "toy_own_k" not in registry.sparsities() and "toy_reads_topk" not in registry.sparsities()


def test_the_toy_is_gone_after_its_test():
    assert "toy_shifted_relu" not in registry.sparsities()
    assert "toy_offset" not in SAEConfig(d_k=D_K, d_v=D_V, n_features=N_F).to_dict()

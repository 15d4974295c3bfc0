"""The CUDA kernel dispatch, checked on CPU by standing fla's naive references in for its Triton kernels:
the arguments we pass (layouts, scale, gates, β folding) must give the engine's own results."""

import pytest
import torch
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from fla.ops.gla.naive import naive_recurrent_gla
from tests.support.scan_inputs import CASES, make_inputs

from recurrent_lens.models import kernels
from recurrent_lens.models.scan import recurrent_scan


def fake_gdn(q, k, v, g, beta, scale, initial_state, output_final_state):
    return naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                            output_final_state=output_final_state)


def fake_gla(q, k, v, g, scale, initial_state, output_final_state):
    # the naive reference applies d_k^-1/2 itself and has no scale argument
    return naive_recurrent_gla(q * scale * q.shape[-1] ** 0.5, k, v, g, initial_state=initial_state,
                               output_final_state=output_final_state)


def fake_simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
    g = torch.zeros_like(q[..., :1]) if g is None else g[..., None]
    return fake_gla(q, k, v, g.expand_as(q), scale, initial_state, output_final_state)


@pytest.mark.parametrize("case", [c for c in CASES if c != "dplr"])
def test_kernel_arguments_reproduce_the_engine(case, monkeypatch):
    monkeypatch.setattr(kernels, "fla_ops", lambda: {"gated_delta_rule": fake_gdn, "gla": fake_gla,
                                                     "simple_gla": fake_simple_gla})
    rule, kw = CASES[case]
    x = make_inputs(rule, 2, 19, 3, 4, 5, **kw)
    S0 = torch.randn(2, 3, 4, 5)
    o, S = kernels.fla_chunked(rule, x, S0)
    ref = recurrent_scan(rule, x, S0)
    torch.testing.assert_close(o.float(), ref.o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S.float(), ref.final_state, atol=1e-5, rtol=1e-5)


def test_cpu_never_uses_kernels():
    rule, kw = CASES["delta-gated"]
    assert not kernels.kernels_enabled(make_inputs(rule, 1, 3, 1, 2, 2, **kw))

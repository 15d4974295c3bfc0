"""The result tables: ``LogitShiftResult``'s fits against hand-computed least squares."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recurrent_lens.analysis.results import LogitShiftResult


def test_fits_against_hand_computed_least_squares():
    g = np.random.default_rng(0)
    rows = []
    for atom in (0, 1):
        for pos in range(5):
            slope = g.uniform(0.5, 2.0)
            for eps in (0.1, 1.0):
                p = eps * g.normal()
                rows.append(dict(atom=atom, eps=eps, batch=0, pos=pos, token=0, predicted=p,
                                 measured=slope * p + 1e-3 * g.normal()))
    res = LogitShiftResult(pd.DataFrame(rows), {"fit": "cell"})
    r = res.to_pandas()
    for (atom, eps), cell in r.groupby(["atom", "eps"]):
        s = np.linalg.lstsq(cell[["predicted"]].to_numpy(), cell["measured"].to_numpy(), rcond=None)[0][0]
        np.testing.assert_allclose(res.fitted("cell")[cell.index], s * cell["predicted"], rtol=1e-10)
    for _, ctx in r.groupby(["atom", "pos"]):
        s = (ctx["predicted"] * ctx["measured"]).sum() / (ctx["predicted"] ** 2).sum()
        np.testing.assert_allclose(res.fitted("context")[ctx.index], s * ctx["predicted"], rtol=1e-10)
    by_fit = res.summary()["median_cell_r2_by_fit"]
    assert by_fit["context"] > 0.999 > by_fit["cell"] and res.summary()["fit"] == "cell"
    with pytest.raises(ValueError, match="fit"):
        res.per_cell("global")

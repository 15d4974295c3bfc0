"""Feature dashboards for state SAEs: what each feature fires on and what its atom reads and writes.

:func:`build_dashboard` runs a model over a dataset once and returns a :class:`Dashboard`: index it by feature,
show a feature inline in a notebook (``dash.show(i)``), get the table (``dash.to_frame()``) or write a static
site that works from ``file://`` (``dash.save("site/")``; also ``recurrent-lens dashboard``).

Example:
    >>> dash = build_dashboard(toy_model, toy_sae, toy_task.make_batch(8, seed=1)[0], features=[0, 1],
    ...                        n_examples=3, progress=False)
    >>> dash.to_frame().columns.tolist()[:3]
    ['density', 'n_firings', 'max_activation']
"""

from recurrent_lens.dashboard.build import build_dashboard
from recurrent_lens.dashboard.view import Dashboard, Example, FeatureData

__all__ = ["build_dashboard", "Dashboard", "FeatureData", "Example"]

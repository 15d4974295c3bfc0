"""The HTML of the feature views and the site: token strings escaped, and where a site may be written."""

import pytest

from recurrent_lens.dashboard import build_dashboard
from recurrent_lens.dashboard.render import check_site_dir


def test_token_strings_are_escaped(toy_setup, dash):
    model, sae, tokens = toy_setup
    i = int(dash.to_frame()["density"].idxmax())
    names = ["<b>bold</b>", 'say "hi"\n'] + [f"t{j}" for j in range(2, model.cfg.d_vocab)]
    d = build_dashboard(model, sae, tokens, features=[i], n_examples=2, token_strings=names, progress=False)
    page = d.html(i)
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "say &quot;hi&quot;↵" in page


def test_a_site_is_not_written_over_a_file(tmp_path):
    path = tmp_path / "site"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match=r"out_dir: expected a directory \(new, empty or an earlier dashboard\), got "
                                         "the file .*site"):
        check_site_dir(path)
    assert path.read_text() == "not a directory"
    assert check_site_dir(tmp_path / "new") == (tmp_path / "new").resolve()

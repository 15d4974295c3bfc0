"""Cells: the one (hook, head) type, its parsing and range checks, and seeded position sampling."""

import re

import numpy as np
import pytest
import torch

from tests.support.helpers import tiny_gdn
from recurrent_lens.states.cells import (
    Cell, check_head, check_heads, matrix_site, parse_cell, parse_cells, sample_positions, split_hook_name,
)


def test_a_cell_knows_its_layer_kind_and_name():
    cell = Cell("blocks.1.mixer.hook_write", 2)
    assert (cell.layer, cell.kind, cell.hook("hook_q")) == (1, "write", "blocks.1.mixer.hook_q")
    assert Cell.from_name(cell.name) == cell


def test_hook_names_are_parsed_and_checked_against_the_model():
    model = tiny_gdn(seed=0)  # recurrent layers 0 and 1
    assert split_hook_name("blocks.7.mixer.hook_state") == (7, "state")
    with pytest.raises(ValueError, match=r"^hook_name: expected 'blocks.\{layer\}.mixer.hook_state' or "):
        split_hook_name("blocks.0.mixer.hook_read")
    with pytest.raises(ValueError, match="names layer 5, which is not a recurrent layer"):
        matrix_site(model.cfg, "blocks.5.mixer.hook_state")
    with pytest.raises(ValueError, match="expected a hook_state hook"):
        parse_cell(model, "blocks.0.mixer.hook_write", 0, kinds=("state",))
    assert parse_cells(model, [("blocks.0.mixer.hook_state", 1), Cell("blocks.0.mixer.hook_state", 1)]) == [
        Cell("blocks.0.mixer.hook_state", 1)]


def test_heads_are_checked_in_one_place():
    assert check_head(np.int64(3), 4) == 3 and check_head(torch.tensor(2), 4) == 2
    for bad in (4, -1, True, 1.0, "1"):
        with pytest.raises(ValueError, match=re.escape(f"head: expected an int in [0, 4), got {bad!r}")):
            check_head(bad, 4)
    assert check_heads([2, 0], 4, "state") == [2, 0]
    with pytest.raises(ValueError, match=re.escape("heads (state): expected a head index or a list of head indices "
                                                   "in [0, 4), got [0, 4]")):
        check_heads([0, 4], 4, "state")


def test_positions_depend_only_on_the_seed_and_the_sequence():
    alone = sample_positions([5], 12, 4, skip=1, seed=3)
    together = sample_positions([2, 5], 12, 4, skip=1, seed=3)
    assert torch.equal(alone[0], together[1]) and bool((together >= 1).all())
    assert not torch.equal(alone, sample_positions([5], 12, 4, skip=1, seed=4))
    with pytest.raises(ValueError, match="skip: sequences of length 3 leave no position after skip=3"):
        sample_positions([0], 3, 2, skip=3)


@pytest.mark.parametrize("head", [True, -1])
def test_a_cell_refuses_a_head_that_is_not_an_int(head):
    with pytest.raises(ValueError, match=rf"^Cell head: expected an int >= 0 for blocks\.0\.mixer\.hook_state, "
                                         rf"got {re.escape(repr(head))}$"):
        Cell("blocks.0.mixer.hook_state", head)


@pytest.mark.parametrize("head", ["two", 1.0])
def test_a_cell_refuses_a_head_of_another_type(head):
    # under the test suite's runtime type checker the annotation refuses it first; without it, __post_init__ does
    with pytest.raises((ValueError, TypeError), match="head"):
        Cell("blocks.0.mixer.hook_state", head)

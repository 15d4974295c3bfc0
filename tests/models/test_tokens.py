"""Text and token ids: the tokenizer helpers, and the checks every input goes through (empty inputs, integer
dtypes, lists, ids out of the vocabulary)."""

import inspect

import pytest
import torch
from tests.support.helpers import tiny_gdn

from recurrent_lens import HookedRecurrentModel


def test_tokenizer_helpers_and_text_generation(with_tokenizer):
    model = with_tokenizer
    tokens = model.to_tokens("w1 w2 w3")
    assert tokens.tolist() == [[3, 4, 5]]
    assert model.to_string(tokens[0]) == "w1 w2 w3"
    assert model.to_str_tokens("w1 w2") == ["w1", "w2"]
    torch.testing.assert_close(model("w1 w2 w3"), model(tokens))
    text = model.generate("w1 w2 w3", max_new_tokens=3, do_sample=False)
    assert isinstance(text, str) and text.startswith("w1 w2 w3")
    with pytest.raises(ValueError, match="different lengths"):
        model.to_tokens(["w1", "w1 w2"])


def test_no_tokenizer_error_and_repr():
    model = tiny_gdn()
    with pytest.raises(ValueError, match="no tokenizer"):
        model.to_tokens("hello")
    assert "gated_deltanet" in repr(model) and "d_k=8" in repr(model)


class ListTokenizer:
    """Whitespace words → ids ``w{i}`` → i; the empty string tokenizes to no ids."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def test_empty_inputs_are_refused_clearly():
    model = tiny_gdn()
    model.tokenizer = ListTokenizer()
    for bad in (torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long),
                torch.zeros(0, dtype=torch.long), [[]], [[], []]):
        with pytest.raises(ValueError, match="tokens: expected at least one sequence of at least one token"):
            model(bad)
        with pytest.raises(ValueError, match="at least one"):
            model.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="tokens: expected at least one token id, got an empty list"):
        model([])
    with pytest.raises(ValueError, match="the text tokenized to no tokens"):
        model("")
    with pytest.raises(ValueError, match="the text tokenized to no tokens"):
        model.generate("", max_new_tokens=2)
    assert model.generate("w1 w2", max_new_tokens=2).startswith("w1 w2 w")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32,
                                   torch.uint64])
def test_integer_dtypes_are_token_ids(dtype):
    model = tiny_gdn()
    tokens = torch.randint(0, 61, (2, 5))
    assert torch.equal(model(tokens.to(dtype)), model(tokens))
    assert torch.equal(model.generate(tokens.to(dtype), max_new_tokens=2, do_sample=False),
                       model.generate(tokens, max_new_tokens=2, do_sample=False))


def test_lists_of_ids_are_tokens_and_lists_of_str_are_text():
    model = tiny_gdn()
    model.tokenizer = ListTokenizer()
    assert torch.equal(model([1, 2, 3]), model(torch.tensor([[1, 2, 3]])))
    assert torch.equal(model([[1, 2], [3, 4]]), model(torch.tensor([[1, 2], [3, 4]])))
    assert torch.equal(model(["w1 w2", "w3 w4"]), model(torch.tensor([[1, 2], [3, 4]])))
    out = model.generate([[1, 2], [3, 4]], max_new_tokens=2, do_sample=False)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, model.generate(torch.tensor([[1, 2], [3, 4]]), 2, do_sample=False))
    assert isinstance(model.generate(["w1 w2"], max_new_tokens=2), list)
    with pytest.raises(ValueError, match=r"rows of equal length, got lengths \[2, 1\]"):
        model([[1, 2], [3]])
    tokens_fn = inspect.unwrap(HookedRecurrentModel._tokens)  # the test-time annotation check samples one item
    with pytest.raises(TypeError, match="only str .* got a list of int, str"):
        tokens_fn(model, [1, "w2"])
    with pytest.raises(TypeError, match=r"int token ids in every row, got 'w2'"):
        tokens_fn(model, [[1, "w2"]])
    with pytest.raises(TypeError, match="got a list of bool"):
        model([True, False])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 61\)"):
        model([1, 61])


def test_non_integer_tensors_are_refused():
    model = tiny_gdn()
    tokens_fn = inspect.unwrap(HookedRecurrentModel._tokens)  # past the test-time annotation check
    with pytest.raises(TypeError, match=r"expected integer token ids, got a tensor of dtype torch.bool \(a bool"):
        tokens_fn(model, torch.tensor([[True, False]]))
    with pytest.raises(TypeError, match="dtype torch.float32"):
        tokens_fn(model, torch.tensor([[1.0, 2.0]]))


def test_token_ids_out_of_vocabulary(qwen_dir):
    _, path = qwen_dir
    model = HookedRecurrentModel.from_pretrained(path)
    with pytest.raises(ValueError, match=r"tokens: ids must lie in \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    # under the test suite's jaxtyping checks the annotation refuses it first (a TypeError); without them, our ValueError
    with pytest.raises((ValueError, TypeError), match="tokens: expected shape|input"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))

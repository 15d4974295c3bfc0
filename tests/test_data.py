"""Token sources: exact windows against hand-computed streams, sharding, resuming, laziness, errors."""

import inspect
import json

import numpy as np
import pytest
import torch

from recurrent_lens import data
from recurrent_lens.data import batches, open_tokens

VOCAB = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "a": 3, "b": 4, "c": 5, "d": 6, "e": 7}
# documents 2 and 5 are empty / whitespace-only and are skipped
DOCS = ["a b c", "", "d e", "a", "   ", "b c d e a"]
# their ids: [3 4 5] [6 7] [3] [4 5 6 7 3]
STREAM_EOS = [3, 4, 5, 2, 6, 7, 2, 3, 2, 4, 5, 6, 7, 3, 2]
STREAM_BOS_SEP = [3, 4, 5, 1, 6, 7, 1, 3, 1, 4, 5, 6, 7, 3, 1]
STREAM_NO_SEP = [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3]
# context 4 with the BOS prepended: [bos] + 3 stream tokens, the 15 stream tokens give exactly 5
WINDOWS_BOS = [[1, 3, 4, 5], [1, 2, 6, 7], [1, 2, 3, 2], [1, 4, 5, 6], [1, 7, 3, 2]]
# context 4 without: 3 windows, the trailing [7, 3, 2] dropped
WINDOWS_PLAIN = [[3, 4, 5, 2], [6, 7, 2, 3], [2, 4, 5, 6]]


def make_tokenizer(*, bos: bool = True, eos: bool = True, adds_bos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    special = {"bos_token": "<bos>"} if bos else {}
    if eos:
        special["eos_token"] = "<eos>"
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **special)


@pytest.fixture(scope="module")
def tok():
    """Has BOS and EOS and adds BOS itself, like Llama-style checkpoints."""
    return make_tokenizer()


def lists(source):
    out = [w.tolist() for w in source]
    for w in source:
        assert w.dtype == torch.long and w.dim() == 1
    return out


def write_txt(tmp_path, docs=DOCS, name="docs.txt"):
    path = tmp_path / name
    path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    return path


def write_jsonl(tmp_path, docs=DOCS, name="docs.jsonl", field="text"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ text
def test_txt_windows_with_bos_from_tokenizer(tmp_path, tok):
    source = open_tokens(write_txt(tmp_path), tokenizer=tok, context_length=4)
    assert source.prepend_bos is True and source.separator_id == 2
    assert lists(source) == WINDOWS_BOS
    assert lists(source) == WINDOWS_BOS  # a second pass starts again


def test_jsonl_windows_equal_txt(tmp_path, tok):
    assert lists(open_tokens(write_jsonl(tmp_path), tokenizer=tok, context_length=4)) == WINDOWS_BOS
    plain = open_tokens(write_jsonl(tmp_path, field="body"), tokenizer=tok, context_length=4, text_field="body",
                        prepend_bos=False)
    assert lists(plain) == WINDOWS_PLAIN


def test_jsonl_skips_blank_lines(tmp_path, tok):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": "a b c"}\n\n{"text": "d e"}\n', encoding="utf-8")
    assert lists(open_tokens(path, tokenizer=tok, context_length=3, prepend_bos=False)) == [[3, 4, 5], [2, 6, 7]]


def test_bos_policy(tmp_path):
    path = write_txt(tmp_path)
    # has a BOS token but does not add it: not prepended by default, prepended on request
    quiet = make_tokenizer(adds_bos=False)
    assert lists(open_tokens(path, tokenizer=quiet, context_length=4)) == WINDOWS_PLAIN
    assert lists(open_tokens(path, tokenizer=quiet, context_length=4, prepend_bos=True)) == WINDOWS_BOS
    # adds BOS itself: prepended by default, not when refused
    assert lists(open_tokens(path, tokenizer=make_tokenizer(), context_length=4, prepend_bos=False)) == WINDOWS_PLAIN
    with pytest.raises(ValueError, match="prepend_bos.*bos_token_id=None"):
        open_tokens(path, tokenizer=make_tokenizer(bos=False, adds_bos=False), context_length=4, prepend_bos=True)
    with pytest.raises(ValueError, match="context_length: expected >= 2"):
        open_tokens(path, tokenizer=make_tokenizer(), context_length=1)


def test_separator_token(tmp_path):
    path = write_txt(tmp_path)
    no_eos = make_tokenizer(eos=False, adds_bos=False)
    assert no_eos.eos_token_id is None
    source = open_tokens(path, tokenizer=no_eos, context_length=5)
    assert source.separator_id == 1 and not source.prepend_bos
    assert lists(source) == [STREAM_BOS_SEP[0:5], STREAM_BOS_SEP[5:10], STREAM_BOS_SEP[10:15]]
    bare = open_tokens(path, tokenizer=make_tokenizer(bos=False, eos=False, adds_bos=False), context_length=4)
    assert bare.separator_id is None
    assert lists(bare) == [STREAM_NO_SEP[0:4], STREAM_NO_SEP[4:8]]
    eos_only = open_tokens(path, tokenizer=make_tokenizer(bos=False, adds_bos=False), context_length=5)
    assert lists(eos_only) == [STREAM_EOS[0:5], STREAM_EOS[5:10], STREAM_EOS[10:15]]


def test_many_documents_cross_tokenizer_batches(tmp_path, tok):
    # more documents than one tokenizer call takes, and one window spanning several calls
    docs = ["a b", "c"] * 100
    stream = [3, 4, 2, 5, 2] * 100
    source = open_tokens(write_txt(tmp_path, docs), tokenizer=tok, context_length=7, prepend_bos=False)
    assert lists(source) == [stream[i:i + 7] for i in range(0, len(stream) - 6, 7)]
    long_ctx = open_tokens(write_txt(tmp_path, docs), tokenizer=tok, context_length=401, prepend_bos=False)
    assert lists(long_ctx) == [stream[:401]]


def test_datasets_save_to_disk(tmp_path, tok):
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "one"))
    assert lists(open_tokens(tmp_path / "one", tokenizer=tok, context_length=4)) == WINDOWS_BOS

    other = datasets.Dataset.from_dict({"text": ["a b c d e a b c"]})
    datasets.DatasetDict(train=other, test=ds).save_to_disk(str(tmp_path / "dict"))
    source = open_tokens(str(tmp_path / "dict"), tokenizer=tok, context_length=4, split="test")
    assert source.kind == "datasets" and lists(source) == WINDOWS_BOS
    assert lists(open_tokens(tmp_path / "dict", tokenizer=tok, context_length=4)) == [[1, 3, 4, 5], [1, 6, 7, 3],
                                                                                       [1, 4, 5, 2]]
    with pytest.raises(ValueError, match=r"split: expected one of \['test', 'train'\].*'validation'"):
        open_tokens(tmp_path / "dict", tokenizer=tok, context_length=4, split="validation")
    with pytest.raises(ValueError, match=r"text_field: .*'body'.*columns: \['text', 'n'\]"):
        open_tokens(tmp_path / "one", tokenizer=tok, context_length=4, text_field="body")


def test_datasets_non_string_row(tmp_path, tok):
    import datasets

    datasets.Dataset.from_dict({"text": ["a b", None]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="row 1: field 'text': expected a string, got NoneType"):
        lists(open_tokens(tmp_path / "ds", tokenizer=tok, context_length=2))


def test_text_shorter_than_one_context(tmp_path, tok):
    source = open_tokens(write_txt(tmp_path), tokenizer=tok, context_length=100)
    with pytest.raises(ValueError, match=r"shorter than one context.* 15 tokens .*context_length=100 \(99 stream"):
        lists(source)
    # a source with windows gives a short shard nothing, without error
    one = open_tokens(write_txt(tmp_path), tokenizer=tok, context_length=15, prepend_bos=False, rank=1, world_size=2)
    assert lists(one) == []


# ------------------------------------------------------------------------------------ pre-tokenized
IDS = np.arange(24, dtype=np.int32).reshape(6, 4) * 3


def test_npy(tmp_path):
    np.save(tmp_path / "ids.npy", IDS)
    source = open_tokens(tmp_path / "ids.npy")
    assert source.context_length == 4 and len(source) == 6 and source.n_sequences == 6
    assert lists(source) == IDS.tolist()
    assert lists(open_tokens(tmp_path / "ids.npy", context_length=4)) == IDS.tolist()
    np.save(tmp_path / "u16.npy", IDS.astype(np.uint16))
    assert lists(open_tokens(tmp_path / "u16.npy")) == IDS.tolist()


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"whatever": torch.from_numpy(IDS)}, str(tmp_path / "one.safetensors"))
    assert lists(open_tokens(tmp_path / "one.safetensors")) == IDS.tolist()
    save_file({"input_ids": torch.from_numpy(IDS).to(torch.int64), "mask": torch.ones(6, 4)},
              str(tmp_path / "two.safetensors"))
    assert lists(open_tokens(tmp_path / "two.safetensors")) == IDS.tolist()
    save_file({"a": torch.from_numpy(IDS), "b": torch.from_numpy(IDS.copy())}, str(tmp_path / "amb.safetensors"))
    with pytest.raises(ValueError, match=r"exactly one named 'input_ids' or 'tokens', got tensors \['a', 'b'\]"):
        open_tokens(tmp_path / "amb.safetensors")
    save_file({"tokens": torch.ones(6, 4)}, str(tmp_path / "float.safetensors"))
    with pytest.raises(ValueError, match="expected an integer dtype for token ids, got F32"):
        open_tokens(tmp_path / "float.safetensors")


def test_pt(tmp_path):
    torch.save(torch.from_numpy(IDS), tmp_path / "t.pt")
    assert lists(open_tokens(tmp_path / "t.pt")) == IDS.tolist()
    torch.save({"tokens": torch.from_numpy(IDS).to(torch.int16), "note": torch.zeros(2)}, tmp_path / "d.pt")
    assert lists(open_tokens(tmp_path / "d.pt")) == IDS.tolist()
    torch.save({"input_ids": torch.zeros(6, 4)}, tmp_path / "f.pt")
    with pytest.raises(ValueError, match="expected an integer dtype for token ids, got float32"):
        open_tokens(tmp_path / "f.pt")
    torch.save({"input_ids": torch.zeros(6, 4, dtype=torch.bool)}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="integer dtype.*got bool"):
        open_tokens(tmp_path / "b.pt")


def test_pretokenized_errors(tmp_path):
    np.save(tmp_path / "ids.npy", IDS)
    with pytest.raises(ValueError, match="holds sequences of 4 tokens, got context_length=8"):
        open_tokens(tmp_path / "ids.npy", context_length=8)
    np.save(tmp_path / "float.npy", IDS.astype(np.float32))
    with pytest.raises(ValueError, match="integer dtype for token ids, got float32"):
        open_tokens(tmp_path / "float.npy")
    np.save(tmp_path / "flat.npy", IDS.reshape(-1))
    with pytest.raises(ValueError, match=r"2-D \[n_seq, ctx\] .*got shape \(24,\)"):
        open_tokens(tmp_path / "flat.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shorter than one context.*0 tokens.*context_length=4"):
        open_tokens(tmp_path / "empty.npy")
    np.save(tmp_path / "neg.npy", np.array([[1, 2], [3, -1]]))
    with pytest.raises(ValueError, match="row 1: expected token ids >= 0, got -1"):
        lists(open_tokens(tmp_path / "neg.npy"))
    with pytest.raises(ValueError, match="prepend_bos: applies to text sources only"):
        open_tokens(tmp_path / "ids.npy", prepend_bos=True)



def test_txt_sample_by_paragraph_and_document(tmp_path, tok):
    """A paragraph keeps its newlines and ends at a blank line; a document is the whole file. The word-level
    tokenizer drops the newlines, so the streams differ only in where the separators (EOS, 2) go."""
    path = tmp_path / "poem.txt"
    path.write_text("a b\nc\n\nd\n\n\ne a\n", encoding="utf-8")
    stream = {"line": [3, 4, 2, 5, 2, 6, 2, 7, 3, 2], "paragraph": [3, 4, 5, 2, 6, 2, 7, 3, 2],
              "document": [3, 4, 5, 6, 7, 3, 2]}
    for by, ids in stream.items():
        source = open_tokens(path, tokenizer=tok, context_length=len(ids), prepend_bos=False, sample_by=by)
        assert lists(source) == [ids] and f"sample_by={by!r}" in repr(source)
    fingerprints = {by: open_tokens(path, tokenizer=tok, context_length=4, sample_by=by).fingerprint()
                    for by in stream}
    assert len({json.dumps(f, sort_keys=True) for f in fingerprints.values()}) == 3  # a resume can't mix them
    # the test run type-checks Literal arguments; a user's run gets this error instead
    with pytest.raises(ValueError, match=r"sample_by: expected one of \('line', 'paragraph', 'document'\), "
                                         r"got 'lines'"):
        inspect.unwrap(open_tokens)(path, tokenizer=tok, context_length=4, sample_by="lines")
    with pytest.raises(ValueError, match="sample_by: applies to .txt files only.*got sample_by='document'"):
        open_tokens(write_jsonl(tmp_path), tokenizer=tok, context_length=4, sample_by="document")

# ------------------------------------------------------------------------------- sharding, resuming
def test_sharding_partitions_the_stream(tmp_path, tok):
    np.save(tmp_path / "ids.npy", IDS)
    sources = {
        "txt": lambda **kw: open_tokens(write_txt(tmp_path), tokenizer=tok, context_length=4, **kw),
        "npy": lambda **kw: open_tokens(tmp_path / "ids.npy", **kw),
    }
    for make in sources.values():
        full = lists(make())
        for world_size in (2, 3, 4):
            shards = [lists(make(rank=r, world_size=world_size)) for r in range(world_size)]
            assert [w for shard in shards for w in shard] != [] and sum(map(len, shards)) == len(full)
            for r, shard in enumerate(shards):
                assert shard == full[r::world_size]
            assert sorted(w for shard in shards for w in shard) == sorted(full)


def test_skip_and_max_sequences_resume(tmp_path, tok):
    np.save(tmp_path / "ids.npy", IDS)
    makers = [
        lambda **kw: open_tokens(write_txt(tmp_path), tokenizer=tok, context_length=4, **kw),
        lambda **kw: open_tokens(tmp_path / "ids.npy", **kw),
    ]
    for make in makers:
        for rank, world_size in [(0, 1), (1, 2)]:
            shard = lists(make(rank=rank, world_size=world_size))
            for k in range(len(shard) + 2):
                head = lists(make(rank=rank, world_size=world_size, max_sequences=k)) if k else []
                rest = lists(make(rank=rank, world_size=world_size, skip=k))
                assert head == shard[:k] and rest == shard[k:]
                assert head + rest == shard
            middle = lists(make(rank=rank, world_size=world_size, skip=1, max_sequences=1))
            assert middle == shard[1:2]
    pre = open_tokens(tmp_path / "ids.npy", rank=1, world_size=4, skip=1, max_sequences=3)
    assert len(pre) == 1 and lists(pre) == [IDS[5].tolist()]


# ------------------------------------------------------------------------------------------ laziness
def test_txt_reads_lazily(tmp_path, tok, monkeypatch):
    path = write_txt(tmp_path, ["a b c d e"] * 100_000)
    size = path.stat().st_size
    handles = []

    def spy_open(*args, **kwargs):
        handles.append(open(*args, **kwargs))
        return handles[-1]

    monkeypatch.setattr(data, "open", spy_open, raising=False)
    windows = iter(open_tokens(path, tokenizer=tok, context_length=8))
    assert next(windows).tolist() == [1, 3, 4, 5, 6, 7, 2, 3]
    (handle,) = handles
    assert size == 1_000_000 and handle.buffer.tell() < 100_000
    windows.close()
    assert handle.closed


def test_jsonl_reads_lazily(tmp_path, tok):
    # the broken last line is never reached when only the first windows are asked for
    path = write_jsonl(tmp_path, ["a b c d e"] * 1000)
    with open(path, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    source = open_tokens(path, tokenizer=tok, context_length=8, max_sequences=5)
    assert len(lists(source)) == 5
    with pytest.raises(ValueError, match=r"docs.jsonl, line 1001: expected a JSON object, got invalid JSON"):
        lists(open_tokens(path, tokenizer=tok, context_length=8))


# -------------------------------------------------------------------------------------------- errors
def test_jsonl_errors(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    missing = r"bad.jsonl, line 2: expected a field text_field='text', got fields \['body'\]"
    with pytest.raises(ValueError, match=missing):
        lists(open_tokens(bad, tokenizer=tok, context_length=2))
    bad.write_text('{"text": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected a JSON object, got list"):
        lists(open_tokens(bad, tokenizer=tok, context_length=2))
    bad.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: field 'text': expected a string, got int"):
        lists(open_tokens(bad, tokenizer=tok, context_length=2))


def test_source_errors(tmp_path, tok):
    path = write_txt(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or directory.*missing.txt"):
        open_tokens(tmp_path / "missing.txt", tokenizer=tok, context_length=4)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        open_tokens(str(tmp_path / "missing"), tokenizer=tok, context_length=4)
    with pytest.raises(ValueError, match="tokenizer: a text source .* got None"):
        open_tokens(path, context_length=4)
    with pytest.raises(ValueError, match="context_length: a text source .* got None"):
        open_tokens(path, tokenizer=tok)
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match=r"source: expected a file ending in one of .*x.csv"):
        open_tokens(tmp_path / "x.csv", tokenizer=tok, context_length=4)
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        open_tokens(tmp_path / "plain_dir", tokenizer=tok, context_length=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=2, world_size=2), r"rank: expected an int in \[0, world_size=2\), got 2"),
    (dict(rank=-1, world_size=2), r"rank: expected an int in \[0, world_size=2\), got -1"),
    (dict(world_size=0), "world_size: expected an int >= 1, got 0"),
    (dict(skip=-1), "skip: expected an int >= 0, got -1"),
    (dict(max_sequences=0), "max_sequences: expected an int >= 1, got 0"),
    (dict(context_length=0), "context_length: expected an int >= 1, got 0"),
])
def test_argument_errors(tmp_path, tok, kwargs, message):
    path = write_txt(tmp_path)
    kwargs = dict(dict(tokenizer=tok, context_length=4), **kwargs)
    with pytest.raises(ValueError, match=message):
        open_tokens(path, **kwargs)


def test_unreachable_hub_dataset(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # the flags are read when the libraries are imported, so the module attributes are patched too
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local file or directory nor a reachable hub dataset"):
        open_tokens("no-such-owner-rl/no-such-dataset-rl", tokenizer=make_tokenizer(), context_length=4)


# ------------------------------------------------------------------------------------------- batches
def test_batches(tmp_path, tok):
    source = open_tokens(write_txt(tmp_path), tokenizer=tok, context_length=4)
    got = list(batches(source, 2))
    assert [b.shape for b in got] == [(2, 4), (2, 4), (1, 4)]
    assert torch.cat(got).tolist() == WINDOWS_BOS and got[0].dtype == torch.long
    assert torch.cat(list(batches(source, 2, drop_last=True))).tolist() == WINDOWS_BOS[:4]
    assert torch.cat(list(batches(source, 5))).tolist() == WINDOWS_BOS
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        next(batches(source, 0))
    with pytest.raises(ValueError, match=r"expected windows of shape \(3,\) like the first, got shape \(2,\)"):
        list(batches([torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long)], 4))


def test_repr(tmp_path, tok):
    source = open_tokens(write_txt(tmp_path), tokenizer=tok, context_length=4, rank=1, world_size=2)
    text = repr(source)
    for part in ("kind='txt'", "docs.txt", "context_length=4", "shard=1/2", "prepend_bos=True", "separator_id=2"):
        assert part in text
    np.save(tmp_path / "ids.npy", IDS)
    text = repr(open_tokens(tmp_path / "ids.npy"))
    assert "kind='npy'" in text and "n_rows=6" in text and "context_length=4" in text


# ------------------------------------------------------------------------------- checks before work
@pytest.mark.parametrize("suffix", ["txt", "jsonl"])
def test_non_utf8_text_names_the_file_and_line(tmp_path, tok, suffix):
    path = (write_txt if suffix == "txt" else write_jsonl)(tmp_path, ["a b c"] * 5000)
    lines = path.read_bytes().split(b"\n")
    lines[4000] = lines[4000].replace(b"b", b"\xff", 1)
    path.write_bytes(b"\n".join(lines))
    column = lines[4000].index(b"\xff") + 1
    message = rf"docs.{suffix}, line 4001: expected UTF-8 text, got byte 0xff at byte {column} of the line"
    source = open_tokens(path, tokenizer=tok, context_length=4)
    assert lists(open_tokens(path, tokenizer=tok, context_length=4, max_sequences=3))  # lazy: the start reads fine
    with pytest.raises(ValueError, match=message):
        source.check()
    with pytest.raises(ValueError, match=message):
        lists(source)


def test_check_finds_bad_ids_of_this_shard_before_reading(tmp_path):
    from safetensors.torch import save_file

    ids = np.tile(np.arange(4, dtype=np.int64), (3000, 1))
    ids[2501, 2] = 500
    np.save(tmp_path / "ids.npy", ids)
    save_file({"input_ids": torch.from_numpy(ids)}, str(tmp_path / "ids.safetensors"))
    torch.save(torch.from_numpy(ids), tmp_path / "ids.pt")
    for suffix in ("npy", "safetensors", "pt"):
        path = tmp_path / f"ids.{suffix}"
        open_tokens(path).check()  # ids >= 0 and no vocabulary to compare with
        open_tokens(path).check(d_vocab=501)
        with pytest.raises(ValueError, match=rf"{suffix} '.*ids.{suffix}', row 2501: expected token ids in "
                                             r"\[0, 100\) \(d_vocab\), got 500"):
            open_tokens(path).check(d_vocab=100)
        open_tokens(path, rank=0, world_size=2).check(d_vocab=100)  # row 2501 belongs to rank 1
        open_tokens(path, max_sequences=2500).check(d_vocab=100)
        with pytest.raises(ValueError, match="row 2501"):
            open_tokens(path, rank=1, world_size=2, skip=1).check(d_vocab=100)
    ids[7, 0] = -3
    np.save(tmp_path / "neg.npy", ids)
    with pytest.raises(ValueError, match="row 7: expected token ids in \\[0, 100\\) \\(d_vocab\\), got -3"):
        open_tokens(tmp_path / "neg.npy").check(d_vocab=100)
    with pytest.raises(ValueError, match="row 7: expected token ids >= 0, got -3"):
        open_tokens(tmp_path / "neg.npy").check()


def test_garbage_npy_names_the_file(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for name in ("junk.npy", "objects.npy"):
        with pytest.raises(ValueError, match=rf"npy '.*{name}': expected a \.npy array of token ids"):
            open_tokens(tmp_path / name)

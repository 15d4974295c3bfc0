"""The on-disk state store: contents against a full forward, dtypes, crash and resume, refusals,
corruption, the reference layout, and deterministic rank-sliced batches."""

import errno
import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

import recurrent_lens.states.store as store_mod
from tests.support.helpers import tiny_gdn
from tests.support.threads import run_in_threads
from recurrent_lens.data import open_tokens
from recurrent_lens.sae import TrainConfig
from recurrent_lens.states.cells import Cell, sample_positions
from recurrent_lens.sae.trainer import MultiCellTrainer
from recurrent_lens.states.store import StateStore, harvest_to_store

CELLS = [Cell("blocks.0.mixer.hook_state", 1), Cell("blocks.1.mixer.hook_write", 3)]
KW = dict(positions_per_seq=3, skip_positions=1, batch_size=2, shard_size=10, seed=5, progress=False)


@pytest.fixture(scope="module")
def model():
    return tiny_gdn(seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 61, (9, 20), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def clean(model, tokens, tmp_path_factory):
    return harvest_to_store(model, CELLS, tokens, tmp_path_factory.mktemp("clean"), **KW)


def by_provenance(store, cell):
    """``{(seq, pos): state}`` of every stored state, checking that no pair occurs twice."""
    idx = torch.arange(store.count(cell))
    seq, pos = store.provenance(cell, idx)
    states = store.read(cell, idx)
    pairs = list(zip(seq.tolist(), pos.tolist()))
    assert len(set(pairs)) == len(pairs), "a (sequence, position) pair is stored twice"
    return dict(zip(pairs, states))


def stored_files(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_contents_equal_a_full_forward(model, tokens, clean):
    store = clean
    assert store.cells == CELLS and store.layout == "native" and store.complete
    assert (store.d_k, store.d_v, store.dtype, store.sequences_done) == (8, 8, "float32", 9)
    assert all(store.count(c) == 27 for c in CELLS)
    m = store.manifest
    # batches of 2 sequences x 3 positions; a flush once >= 10 states wait: 12, 12, then the last 3
    assert [s["count"] for s in m["cells"][0]["shards"]] == [12, 12, 3]
    assert m["positions"] == {"positions_per_seq": 3, "skip_positions": 1, "seed": 5, "per_sequence": 3}
    assert m["context_length"] == 20 and m["model"]["architecture"] == "gated_deltanet" and m["model"]["n_heads"] == 4
    assert stored_files(store.path) == sorted(["manifest.json"] + [f"{c.name}/shard_0000{k}.safetensors"
                                                                   for c in CELLS for k in range(3)])
    _, cache = model.run_with_cache(tokens)
    expected_pos = sample_positions(torch.arange(9), 20, 3, skip=1, seed=5)
    for cell in CELLS:
        seq, pos = store.provenance(cell, torch.arange(27))
        assert torch.equal(seq, torch.arange(9).repeat_interleave(3)) and torch.equal(pos, expected_pos.reshape(-1))
        full = cache[cell.hook_name][seq, pos, cell.head]
        torch.testing.assert_close(store.read(cell, torch.arange(27)), full, rtol=1e-5, atol=1e-5)
    # one state against states_at, read through the cell's name
    layer = 1
    one = model.states_at(tokens[4:5], layer, pos[13:14], heads=[3], what="write")[0, 0, 0]
    torch.testing.assert_close(store.read("blocks.1.mixer.hook_write.h3", torch.tensor([13]))[0], one,
                               rtol=1e-5, atol=1e-6)
    assert "cells=2, count=27, d_k=8, d_v=8, dtype=float32" in repr(store)


def test_harvest_to_store_from_several_threads_on_one_model(model, tokens, clean, tmp_path):
    """Four stores harvested at once from one model, with other cells and seeds between them, hold what a
    harvest alone stores."""
    kws = [dict(KW, seed=5 + t % 2, batch_size=1 + t % 3) for t in range(4)]
    cells = [CELLS if t % 2 == 0 else CELLS[::-1] for t in range(4)]
    alone = [harvest_to_store(model, cells[t], tokens, tmp_path / f"alone{t}", **kws[t]) for t in range(4)]
    errors = run_in_threads(4, lambda t: harvest_to_store(model, cells[t], tokens, tmp_path / f"threaded{t}", **kws[t]))
    assert not errors, errors
    for t in range(4):
        got = StateStore(tmp_path / f"threaded{t}")
        for cell in CELLS:
            idx = torch.arange(alone[t].count(cell))
            assert torch.equal(got.read(cell, idx), alone[t].read(cell, idx)), (t, cell)
            assert all(torch.equal(a, b) for a, b in zip(got.provenance(cell, idx), alone[t].provenance(cell, idx)))


def test_read_across_shards_any_order_and_bounded_cache(clean):
    cell = CELLS[0]
    all_states = clean.read(cell, torch.arange(27))
    index = torch.tensor([26, 0, 13, 13, 11, 12, 25, 1])
    assert torch.equal(StateStore(clean.path).read(cell, index), all_states[index])
    assert len(clean._cache) <= 2
    assert clean.read(cell, torch.tensor([], dtype=torch.long)).shape == (0, 8, 8)
    with pytest.raises(ValueError, match=r"index: expected values in \[0, 27\)"):
        clean.read(cell, torch.tensor([27]))
    with pytest.raises(ValueError, match="cell: expected one of the stored cells"):
        clean.read(Cell("blocks.0.mixer.hook_state", 0), torch.tensor([0]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_round_trip(model, tokens, clean, tmp_path, dtype):
    half = harvest_to_store(model, CELLS, tokens, tmp_path, **dict(KW, dtype=dtype))
    assert half.dtype == dtype and half.manifest["dtype"] == dtype
    tdtype = getattr(torch, dtype)
    for cell in CELLS:
        got = half.read(cell, torch.arange(27))
        assert got.dtype == torch.float32
        assert torch.equal(got, clean.read(cell, torch.arange(27)).to(tdtype).float())


def crashing(tokens, n):
    """The rows of ``tokens`` as an iterable that crashes after ``n`` sequences."""
    for i, row in enumerate(tokens):
        if i == n:
            raise RuntimeError("simulated crash")
        yield row


def assert_same_as_clean(store, clean, exact=True):
    """Same (sequence, position) pairs, each once, with the same states: bit for bit when the batches were
    the same, else within fp32 rounding (a model pass need not give bitwise equal rows for other batch sizes)."""
    assert store.sequences_done == clean.sequences_done and store.complete
    for cell in CELLS:
        got, want = by_provenance(store, cell), by_provenance(clean, cell)
        assert got.keys() == want.keys()
        for pair in want:
            if exact:
                assert torch.equal(got[pair], want[pair]), pair
            else:
                torch.testing.assert_close(got[pair], want[pair], rtol=1e-6, atol=1e-7)
    named = {f"{e['name']}/{s['file']}" for e in store.manifest["cells"] for s in e["shards"]}
    assert set(stored_files(store.path)) == named | {"manifest.json"}


def test_resume_after_a_crash_stores_every_sequence_once(model, tokens, clean, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        harvest_to_store(model, CELLS, crashing(tokens, 7), tmp_path, **KW)
    partial = StateStore(tmp_path)
    # flushed after sequences 0-3; 4-5 waited in memory, 6 was in the batch that crashed
    assert partial.sequences_done == 4 and not partial.complete and partial.count(CELLS[0]) == 12
    (tmp_path / CELLS[0].name / ".tmp-left-by-a-kill.safetensors").write_bytes(b"junk")
    resumed = harvest_to_store(model, CELLS, iter(list(tokens)), tmp_path, **dict(KW, batch_size=3))
    assert_same_as_clean(resumed, clean, exact=False)
    # running again on a finished store changes nothing
    again = harvest_to_store(model, CELLS, tokens, tmp_path, **KW)
    assert again.manifest == resumed.manifest


def test_training_on_an_incomplete_store_warns(model, tokens, clean, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        harvest_to_store(model, CELLS, crashing(tokens, 7), tmp_path, **KW)
    partial = StateStore(tmp_path)
    cfg = TrainConfig(n_steps=1, batch_size=4, n_features=8, k=2, buffer_size=8, progress=False)
    with pytest.warns(RuntimeWarning, match=r"the state store .* is INCOMPLETE: its harvest stopped after 4 "
                                            r"sequences \(12 states per cell\) and never finished"):
        MultiCellTrainer(None, CELLS, partial, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MultiCellTrainer(None, CELLS, clean, cfg)


def test_disk_full_names_the_file_and_leaves_nothing_half_written(model, tokens, clean, tmp_path, monkeypatch):
    real = store_mod.save_file
    calls = []

    def fill_the_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 4:  # the second shard of the second cell: part of it reaches the disk
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(store_mod, "save_file", fill_the_disk)
    shard = os.path.join(str(tmp_path), CELLS[1].name, "shard_00001.safetensors")
    with pytest.raises(OSError, match=rf"cannot write {re.escape(shard)}: No space left on device") as e:
        harvest_to_store(model, CELLS, tokens, tmp_path, **KW)
    assert e.value.errno == errno.ENOSPC
    assert not [f for f in stored_files(tmp_path) if ".tmp" in f]
    partial = StateStore(tmp_path)  # the manifest still names the first, complete shards only
    assert partial.sequences_done == 4 and partial.count(CELLS[0]) == 12
    monkeypatch.setattr(store_mod, "save_file", real)
    assert_same_as_clean(harvest_to_store(model, CELLS, tokens, tmp_path, **KW), clean, exact=True)


def test_out_of_vocabulary_ids_deep_in_a_token_file_are_refused_before_any_work(model, tmp_path):
    ids = np.random.default_rng(0).integers(0, 61, (300, 20))
    ids[290, 3] = 61
    np.save(tmp_path / "ids.npy", ids)
    message = r"npy '.*ids.npy', row 290: expected token ids in \[0, 61\) \(d_vocab\), got 61"
    with pytest.raises(ValueError, match=message):
        harvest_to_store(model, CELLS, open_tokens(tmp_path / "ids.npy"), tmp_path / "store", **KW)
    assert not (tmp_path / "store").exists()
    with pytest.raises(ValueError, match=message):
        MultiCellTrainer(model, CELLS, open_tokens(tmp_path / "ids.npy"), TrainConfig(batch_size=8, buffer_size=8))


def test_manifest_write_failure_leaves_orphans_that_resume_deletes(model, tokens, clean, tmp_path, monkeypatch):
    real, calls = store_mod._write_manifest, []

    def fail_second(out_dir, manifest):
        calls.append(manifest["sequences_done"])
        if len(calls) == 3:
            raise OSError("disk full")
        real(out_dir, manifest)

    monkeypatch.setattr(store_mod, "_write_manifest", fail_second)
    with pytest.raises(OSError, match="disk full"):
        harvest_to_store(model, CELLS, tokens, tmp_path, **KW)
    assert calls == [0, 4, 8]  # the new store, the first flush, the failed second flush
    orphan = tmp_path / CELLS[1].name / "shard_00001.safetensors"
    assert orphan.exists() and StateStore(tmp_path).sequences_done == 4
    monkeypatch.setattr(store_mod, "_write_manifest", real)
    assert_same_as_clean(harvest_to_store(model, CELLS, tokens, tmp_path, **KW), clean)


def test_max_sequences_then_extend(model, tokens, clean, tmp_path):
    first = harvest_to_store(model, CELLS, tokens, tmp_path, **dict(KW, max_sequences=5))
    assert first.sequences_done == 5 and first.count(CELLS[1]) == 15
    assert_same_as_clean(harvest_to_store(model, CELLS, tokens, tmp_path, **KW), clean)


def test_resume_refuses_other_settings_or_a_shorter_source(model, tokens, tmp_path):
    harvest_to_store(model, CELLS, tokens, tmp_path, **dict(KW, max_sequences=4))
    for change, pattern in [({"seed": 6}, "positions.seed: the store has 5, this call 6"),
                            ({"dtype": "bfloat16"}, "dtype: the store has 'float32', this call 'bfloat16'"),
                            ({"positions_per_seq": 4}, "positions.positions_per_seq: the store has 3, this call 4")]:
        with pytest.raises(ValueError, match=pattern):
            harvest_to_store(model, CELLS, tokens, tmp_path, **dict(KW, **change))
    with pytest.raises(ValueError, match="cells: the store has"):
        harvest_to_store(model, CELLS[:1], tokens, tmp_path, **KW)
    with pytest.raises(ValueError, match="context_length: the store has 20, this call 12"):
        harvest_to_store(model, CELLS, tokens[:, :12], tmp_path, **KW)
    with pytest.raises(ValueError, match="holds the first 4 sequences, but the source yields only 3"):
        harvest_to_store(model, CELLS, tokens[:3], tmp_path, **KW)


def test_refusals_before_any_model_work(model, tokens, tmp_path, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model, "harvest", no_model_work)
    out = tmp_path / "out"
    (tmp_path / "file").write_text("x")
    cases = [
        (dict(out_dir=tmp_path / "file" / "sub"), "out_dir: cannot create"),
        (dict(out_dir=tmp_path / "file"), "out_dir: cannot create"),
        (dict(dtype="int8"), "dtype: expected one of"),
        (dict(cells=[("blocks.0.mixer.hook_key", 0)]), "hook_name: expected"),
        (dict(cells=[("blocks.0.mixer.hook_state", 4)]), r"head: expected an int in \[0, 4\)"),
        (dict(tokens=torch.zeros(0, 20, dtype=torch.long)), "at least one sequence"),
        (dict(tokens=iter([])), "the source yields no sequence"),
        (dict(tokens=tokens.float()), "integer tensor"),
        (dict(tokens=[torch.zeros(2, 3, dtype=torch.long)]), "sequence 0: expected a non-empty 1-D integer"),
        (dict(skip_positions=20), "skip_positions: sequences of length 20 leave no position after skip_positions=20"),
        (dict(positions_per_seq=0), "positions_per_seq: expected an int >= 1, got 0"),
        (dict(batch_size=0), "batch_size: expected an int >= 1"),
        (dict(max_sequences=0), "max_sequences: expected an int >= 1"),
    ]
    for change, pattern in cases:
        kw = dict(dict(KW, cells=CELLS, tokens=tokens, out_dir=out), **change)
        with pytest.raises(ValueError, match=pattern):
            harvest_to_store(model, kw.pop("cells"), kw.pop("tokens"), kw.pop("out_dir"), **kw)
        assert not out.exists(), change
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no manifest.json"):
        harvest_to_store(model, CELLS, tokens, out, **KW)


def test_unwritable_out_dir_refused(model, tokens, tmp_path, monkeypatch):
    def refuse(out_dir, manifest):
        raise PermissionError(13, "Permission denied", out_dir)

    monkeypatch.setattr(model, "harvest", None)  # any model work would fail with a TypeError
    monkeypatch.setattr(store_mod, "_write_manifest", refuse)
    with pytest.raises(ValueError, match="out_dir: cannot write into .* Permission denied"):
        harvest_to_store(model, CELLS, tokens, tmp_path, **KW)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_refused(model, tokens, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="out_dir: cannot create"):
            harvest_to_store(model, CELLS, tokens, parent / "out", **KW)
    finally:
        parent.chmod(0o700)


def test_a_bad_sequence_mid_stream_is_named(model, tokens, tmp_path):
    rows = list(tokens[:3]) + [tokens[3, :10]]
    with pytest.raises(ValueError, match="sequence 3: expected a length-20 1-D integer tensor, got shape"):
        harvest_to_store(model, CELLS, rows, tmp_path, **KW)


def test_corrupt_stores_are_named(clean, tmp_path):
    path = tmp_path / "s"
    shutil.copytree(clean.path, path)
    manifest = path / "manifest.json"
    good = manifest.read_text()

    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        StateStore(path)
    manifest.write_text(good.replace('"version": 1', '"version": 2'))
    with pytest.raises(ValueError, match="manifest.json: format version 2, this library reads version 1"):
        StateStore(path)
    m = json.loads(good)
    m["positions"]["seed"] = 6
    manifest.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="fingerprint does not match"):
        StateStore(path)
    manifest.write_text(good)

    shard0 = path / CELLS[1].name / "shard_00000.safetensors"
    shard2 = path / CELLS[1].name / "shard_00002.safetensors"
    data = shard0.read_bytes()
    shard0.write_bytes(shard2.read_bytes())  # 3 states where the manifest says 12
    with pytest.raises(ValueError, match=r"shard_00000\.safetensors: states holds 3 states, the manifest says 12"):
        StateStore(path)
    shard0.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"shard_00000\.safetensors is truncated: tensor '\w+' ends at byte \d+, "
                                         r"the file has \d+"):
        StateStore(path)
    shard0.unlink()
    with pytest.raises(ValueError, match=r"shard_00000\.safetensors: shard file named in the manifest is missing"):
        StateStore(path)
    with pytest.raises(FileNotFoundError, match="no store directory"):
        StateStore(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds neither manifest.json nor reference"):
        StateStore(tmp_path / "s" / CELLS[0].name)


def _rewrite_header(path, edit):
    """Rewrite the JSON header of safetensors file ``path`` through ``edit(header)``, keeping its data bytes."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _shift(name, delta):
    def edit(header):
        header[name]["data_offsets"] = [o + delta for o in header[name]["data_offsets"]]
    return edit


@pytest.mark.parametrize("edit, message", [
    # position (the first array) moved 8 bytes earlier: it would read header bytes as positions
    (_shift("position", -8), r"tensor 'position' field 'data_offsets': expected \[begin, end\] with "
                             r"0 <= begin <= end, got \[-8, 88\]"),
    # seq_index starting inside position: both would be read from the same bytes
    (lambda h: h["seq_index"].update(data_offsets=[48, 144]), r"tensor 'seq_index' \(data_offsets \[48, 144\]\) "
                                                               r"overlaps tensor 'position'"),
    (_shift("position", 8), "tensor 'position' .* leaves 8 unused bytes after the start of the data"),
    (lambda h: h["states"].update(shape=[12, 8, 4]), r"tensor 'states' holds \d+ bytes .* need \d+"),
    (lambda h: h["seq_index"].update(dtype="F64"), r"seq_index: expected dtype I64 and shape \[12\], got F64"),
    (lambda h: h["states"].update(data_offsets=["0", 3072]), "field 'data_offsets': expected"),
    (lambda h: h.update(extra={"dtype": "I64", "shape": [0], "data_offsets": [0, 0]}),
     r"expected the tensors \['position', 'seq_index', 'states'\], it also holds \['extra'\]"),
])
def test_shard_headers_are_validated(clean, tmp_path, edit, message):
    """A shard whose header does not describe its bytes is refused on opening, naming the file and tensor,
    never read as states or provenance."""
    path = tmp_path / "s"
    shutil.copytree(clean.path, path)
    shard = path / CELLS[0].name / "shard_00000.safetensors"
    _rewrite_header(shard, edit)
    with pytest.raises(ValueError, match=re.escape(str(shard)) + ".*(" + message + ")"):
        StateStore(path)


def test_reference_layout(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {(0, 0): rng.standard_normal((5, 3, 2)).astype(np.float16),
              (0, 2): rng.standard_normal((4, 3, 2)).astype(np.float16),
              (1, 0): rng.standard_normal((6, 3, 2)).astype(np.float16)}
    for (layer, head), a in arrays.items():
        (tmp_path / f"layer_{layer}").mkdir(exist_ok=True)
        np.save(tmp_path / f"layer_{layer}" / f"head_{head}.npy", a)
    (tmp_path / "layer_1" / "notes.txt").write_text("ignored")
    store = StateStore(tmp_path)
    assert store.layout == "reference" and store.manifest is None and store.complete
    assert store.cells == [Cell(f"blocks.{l}.mixer.hook_state", h) for l, h in arrays]
    assert (store.d_k, store.d_v, store.dtype) == (3, 2, "float16")
    assert [store.count(c) for c in store.cells] == [5, 4, 6]
    got = store.read(("blocks.0.mixer.hook_state", 2), torch.tensor([3, 0, 3]))
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(arrays[0, 2][[3, 0, 3]].astype(np.float32)))
    assert isinstance(store._open(store.cells[0], 0, "states"), np.memmap)  # read lazily
    assert "layout=reference, cells=3, counts=4..6" in repr(store)
    with pytest.raises(ValueError, match="records no sequence or position"):
        store.provenance(store.cells[0], torch.tensor([0]))

    np.save(tmp_path / "layer_1" / "head_1.npy", np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"head_1\.npy: states of shape \(2, 3\), other heads have \(3, 2\)"):
        StateStore(tmp_path)
    np.save(tmp_path / "layer_1" / "head_1.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"head_1\.npy: expected a float16 or float32 array of shape \(N, d_k, d_v\)"):
        StateStore(tmp_path)
    raw = (tmp_path / "layer_0" / "head_0.npy").read_bytes()
    (tmp_path / "layer_1" / "head_1.npy").write_bytes(raw[:-8])
    with pytest.raises(ValueError, match=r"head_1\.npy: not a readable \.npy array"):
        StateStore(tmp_path)


@pytest.fixture
def ref_store(tmp_path):
    (tmp_path / "layer_0").mkdir()
    np.save(tmp_path / "layer_0" / "head_0.npy", np.arange(22 * 2 * 2, dtype=np.float32).reshape(22, 2, 2))
    return StateStore(tmp_path)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batch_order_is_deterministic_per_seed_and_epoch(ref_store):
    cell = ref_store.cells[0]
    assert ref_store.batches_per_epoch(cell, 4) == 5
    a = take(ref_store.batch_indices(cell, 4, seed=7), 15)
    assert all(torch.equal(x, y) for x, y in zip(a, take(ref_store.batch_indices(cell, 4, seed=7), 15)))
    assert not all(torch.equal(x, y) for x, y in zip(a, take(ref_store.batch_indices(cell, 4, seed=8), 15)))
    epochs = [torch.cat(a[5 * e:5 * e + 5]) for e in range(3)]
    for e in epochs:  # each epoch draws 20 distinct states of the 22
        assert len(set(e.tolist())) == 20 and int(e.max()) < 22
    assert not torch.equal(epochs[0], epochs[1])
    assert all(torch.equal(x, y) for x, y in zip(a[7:], ref_store.batch_indices(cell, 4, seed=7, start=7, epochs=3)))
    assert len(list(ref_store.batch_indices(cell, 4, seed=7, epochs=3))) == 15
    plain = list(ref_store.batch_indices(cell, 4, shuffle=False, epochs=1))
    assert torch.equal(torch.cat(plain), torch.arange(20))
    states = list(ref_store.iter_batches(cell, 4, seed=7, epochs=1))
    assert all(torch.equal(s, ref_store.read(cell, i)) for s, i in zip(states, a[:5]))


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_each_global_batch(ref_store, world_size):
    cell = ref_store.cells[0]
    single = take(ref_store.iter_batches(cell, 8, seed=3, start=1), 6)
    ranks = [take(ref_store.iter_batches(cell, 8, seed=3, start=1, rank=r, world_size=world_size), 6)
             for r in range(world_size)]
    for step, whole in enumerate(single):
        parts = [ranks[r][step] for r in range(world_size)]
        assert all(p.shape == (8 // world_size, 2, 2) for p in parts)
        assert torch.equal(torch.cat(parts), whole)


def test_batch_argument_errors(ref_store):
    cell = ref_store.cells[0]
    with pytest.raises(ValueError, match="batch_size: expected a multiple of world_size=3"):
        next(ref_store.iter_batches(cell, 8, world_size=3))
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 2\)"):
        next(ref_store.iter_batches(cell, 8, rank=2, world_size=2))
    with pytest.raises(ValueError, match="batch_size: expected at most the 22 states"):
        next(ref_store.iter_batches(cell, 23))
    with pytest.raises(ValueError, match="start: expected an int >= 0"):
        next(ref_store.iter_batches(cell, 4, start=-1))


def test_resume_checks_the_weights_and_the_data_not_the_name(model, tokens, tmp_path):
    harvest_to_store(model, CELLS, tokens, tmp_path, **dict(KW, max_sequences=4, model_name="./ck"))
    changed = tiny_gdn(seed=0)
    with torch.no_grad():
        changed.blocks[0].mixer.in_proj_qkv.weight.mul_(1.001)  # the same shapes and config, other weights
    with pytest.raises(ValueError, match=r"other weights: sha256: recorded '[0-9a-f]{64}', current '[0-9a-f]{64}'"
                                         r".*use another output directory \(--out\) or delete"):
        harvest_to_store(changed, CELLS, tokens, tmp_path, **KW)
    other = tokens.clone()
    other[2, 5] += 1
    with pytest.raises(ValueError, match="first 4 sequences are not the source's first 4 .* other data"):
        harvest_to_store(model, CELLS, other, tmp_path, **KW)
    with pytest.raises(ValueError, match="first 4 sequences are not"):
        harvest_to_store(model, CELLS, tokens[[1, 0, *range(2, 9)]], tmp_path, **KW)  # same rows, other order
    assert StateStore(tmp_path).sequences_done == 4
    # the checkpoint's name is a label: spelled otherwise, the same weights resume
    store = harvest_to_store(model, CELLS, list(tokens), tmp_path, **dict(KW, model_name=os.path.abspath("ck")))
    assert store.complete and store.sequences_done == 9


def test_resume_checks_a_file_source(model, tokens, tmp_path):
    ids = tmp_path / "ids.npy"
    np.save(ids, tokens.numpy())
    out = tmp_path / "store"
    harvest_to_store(model, CELLS, open_tokens(ids), out, **dict(KW, max_sequences=4))
    with pytest.raises(ValueError, match="other data .*skip: recorded 0, current 1"):
        harvest_to_store(model, CELLS, open_tokens(ids, skip=1), out, **KW)
    np.save(ids, np.concatenate([tokens.numpy(), tokens.numpy()[:1]]))
    with pytest.raises(ValueError, match="other data .*content: recorded"):
        harvest_to_store(model, CELLS, open_tokens(ids), out, **KW)


def test_a_store_without_recorded_weights_is_not_resumed(model, tokens, tmp_path):
    harvest_to_store(model, CELLS, tokens, tmp_path, **dict(KW, max_sequences=4))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for key in ("weights", "data", "sequences_sha256"):
        del manifest[key]
    manifest["fingerprint"] = store_mod._fingerprint(store_mod._settings_of(manifest),
                                                     [c["name"] for c in manifest["cells"]])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert StateStore(tmp_path).count(CELLS[0]) == 12  # still readable
    with pytest.raises(ValueError, match="older recurrent_lens that did not record the weights and data"):
        harvest_to_store(model, CELLS, tokens, tmp_path, **KW)


def test_non_finite_states_are_never_stored(model, tokens, tmp_path, monkeypatch):
    from recurrent_lens.integrity import NonFiniteError

    broken = tiny_gdn(seed=0)
    with torch.no_grad():
        broken.blocks[1].ln1.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"layer 1 \(blocks.1.mixer.hook_write\), head 3: non-finite state at "
                                             r"sequence 0, position \d+"):
        harvest_to_store(broken, CELLS, tokens, tmp_path / "nan", **KW)
    assert StateStore(tmp_path / "nan").sequences_done == 0

    real = store_mod.harvest_cells

    def one_huge_state(model, toks, positions, cells):
        got = real(model, toks, positions, cells)
        if toks.shape[0] == 2 and torch.equal(toks[1], tokens[5]):  # sequence 5, its second sampled position
            got[CELLS[0]][KW["positions_per_seq"] + 1, 2, 3] = 1e30
        return got

    monkeypatch.setattr(store_mod, "harvest_cells", one_huge_state)
    position = int(sample_positions([5], 20, 3, skip=1, seed=5)[0, 1])
    store = harvest_to_store(model, CELLS, tokens, tmp_path / "fp32", **KW)  # finite: stored as it is
    assert store.read(CELLS[0], torch.arange(27)).abs().max() == 1e30
    with pytest.raises(NonFiniteError, match=rf"layer 0 \(blocks.0.mixer.hook_state\), head 1: non-finite state at "
                                             rf"sequence 5, position {position} .*overflows float16"):
        harvest_to_store(model, CELLS, tokens, tmp_path / "fp16", **dict(KW, dtype="float16"))
    assert StateStore(tmp_path / "fp16").sequences_done == 4  # the flushed sequences before it, nothing after

"""from_pretrained: formats, sharding, dtype/device, streaming memory, and clear errors on bad checkpoints."""

import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
from tests.support.helpers import PEAK_RSS_SCRIPT, perturb_, tiny_qwen3_5
from safetensors.torch import load_file, save_file

from recurrent_lens import HookedRecurrentModel
from recurrent_lens.models.loading import CheckpointError, SafetensorsFile


def test_sharded_checkpoint_gives_identical_logits(qwen_dir, tmp_path):
    ref, path = qwen_dir
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    tokens = torch.randint(0, 97, (2, 19))
    a = HookedRecurrentModel.from_pretrained(path)(tokens)
    b = HookedRecurrentModel.from_pretrained(tmp_path)(tokens)
    assert torch.equal(a, b)


def test_hub_multimodal_layout_loads_text_part(tmp_path):
    """Hub checkpoints are Qwen3_5ForConditionalGeneration: text config nested, vision tower and MTP to skip."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    small = tiny_qwen3_5(seed=2)
    text = small.config.to_dict()
    cfg = Qwen3_5Config(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                        out_hidden_size=text["hidden_size"], patch_size=4, spatial_merge_size=1, temporal_patch_size=1),
                        tie_word_embeddings=True)
    torch.manual_seed(0)
    full = perturb_(Qwen3_5ForConditionalGeneration(cfg), 0.1).eval()
    full.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("model.visual.") for k in saved)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3_5"
    # an MTP head as in the hub files, which the model must skip
    saved["mtp.fc.weight"] = torch.zeros(4, 4)
    save_file(saved, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = HookedRecurrentModel.from_pretrained(tmp_path)
    tokens = torch.randint(0, 97, (1, 23))
    with torch.no_grad():
        expected = full(input_ids=tokens).logits
    assert (model(tokens) - expected).abs().max() < 1e-4


def test_dtype_is_honoured(qwen_dir):
    _, path = qwen_dir
    model = HookedRecurrentModel.from_pretrained(path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.cfg.dtype == "bfloat16"
    logits = model(torch.randint(0, 97, (1, 9)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'gpt2'.*supported"):
        HookedRecurrentModel.from_pretrained(tmp_path)


def test_missing_weights_file(qwen_dir, tmp_path):
    _, path = qwen_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights"):
        HookedRecurrentModel.from_pretrained(tmp_path)


def test_truncated_weights_file(qwen_dir, tmp_path):
    _, path = qwen_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        HookedRecurrentModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        HookedRecurrentModel.from_pretrained(tmp_path)


def test_missing_shard_and_missing_keys(qwen_dir, tmp_path):
    ref, path = qwen_dir
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        HookedRecurrentModel.from_pretrained(tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.linear_attn.A_log"]
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text((path / "config.json").read_text())
    save_file(weights, single / "model.safetensors")
    with pytest.raises(CheckpointError, match="unset.*blocks.1.mixer.A_log"):
        HookedRecurrentModel.from_pretrained(single)


def test_wrong_shape_in_checkpoint(qwen_dir, tmp_path):
    _, path = qwen_dir
    weights = load_file(path / "model.safetensors")
    weights["model.norm.weight"] = torch.zeros(3)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight.*expected shape \\(64,\\).*got \\(3,\\)"):
        HookedRecurrentModel.from_pretrained(tmp_path)


def test_streaming_load_peak_memory(tmp_path):
    """Peak resident memory while loading ~50 MB of weights stays under 1.3x their size
    (benchmarks/bench_models.py measures ~200 MB)."""
    from recurrent_lens import ModelConfig

    cfg = ModelConfig(architecture="gated_deltanet", d_model=512, n_layers=4, d_vocab=8000, n_heads=8, d_k=64,
                      d_v=64, d_mlp=1024, norm="rms_one_plus", tie_embeddings=True)
    model = HookedRecurrentModel.from_config(cfg)
    state = {_qwen_key(name): p for name, p in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(_qwen_config(cfg)))
    del model, state
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
    weights, peak = map(int, out.stdout.split())
    assert peak < 1.3 * weights, f"peak {peak / 2**20:.1f} MiB for {weights / 2**20:.1f} MiB of weights"


def _qwen_key(name):
    """Our parameter names back to transformers' qwen3_5_text names (the inverse of map_qwen3_5_weight)."""
    name = name.replace("blocks.", "model.layers.").replace(".mixer.", ".linear_attn.")
    name = name.replace(".ln1.", ".input_layernorm.").replace(".ln2.", ".post_attention_layernorm.")
    return {"embed.weight": "model.embed_tokens.weight", "ln_final.weight": "model.norm.weight"}.get(name, name)


def _qwen_config(cfg):
    return {
        "model_type": "qwen3_5_text", "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "vocab_size": cfg.d_vocab, "linear_num_value_heads": cfg.n_heads, "linear_num_key_heads": cfg.n_key_heads,
        "linear_key_head_dim": cfg.d_k, "linear_value_head_dim": cfg.d_v, "intermediate_size": cfg.d_mlp,
        "rms_norm_eps": 1e-6, "linear_conv_kernel_dim": 4, "tie_word_embeddings": True,
        "layer_types": ["linear_attention"] * cfg.n_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64,
    }


# ---------------------------------------------------------------- safetensors headers


def split_safetensors(data):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header, body, raw_header=None):
    raw = json.dumps(header).encode() if raw_header is None else raw_header
    return len(raw).to_bytes(8, "little") + raw + body


def read_ours(path):
    f = SafetensorsFile(path)
    out = {}
    for key, e in f.entries.items():
        out[key] = torch.empty(e.shape, dtype=e.dtype)
        f.read_into(key, out[key])
    return out


def read_reference(path):
    try:
        return load_file(path)
    except Exception:  # the library raises SafetensorError, and others (OverflowError...) for odd headers
        return None


def same_tensors(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g).bfloat16(),
               "ids": torch.arange(3), "mask": torch.tensor([True, False, True, True, False]),
               "h": torch.randn(1, 2, generator=g).half(), "empty": torch.zeros(0, 4),
               "i8": torch.tensor([-3], dtype=torch.int8)}
    path = tmp_path_factory.mktemp("st") / "small.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def header_mutations(header, body, seed=0):
    """Corrupt (or harmless) variants of a safetensors file: (name, file bytes, harmless?)."""
    rng = random.Random(seed)
    names = sorted(k for k in header if k != "__metadata__")
    out = []

    def entry(name, fn, harmless=False):
        h = json.loads(json.dumps(header))
        fn(h)
        out.append((name, join_safetensors(h, body), harmless))

    bad_values = [-1, None, "0", 1.5, True, [], {}, [0], [0, 1, 2], 2**64, -2**63]
    for key in names:
        b, e = header[key]["data_offsets"]
        shape = header[key]["shape"]
        for nb, ne in [(b - 1, e), (b + 1, e), (b, e - 1), (b, e + 1), (e, b), (b - 1, e - 1), (b + 1, e + 1),
                       (-b - 1, e), (b, -1), (b, len(body) + 1), (b + len(body), e + len(body)), (0, e - b), (b, b)]:
            entry(f"{key}.data_offsets={[nb, ne]}", lambda h, key=key, v=[nb, ne]: h[key].update(data_offsets=v))
        for other in names:
            if other != key:
                entry(f"{key}.data_offsets=those of {other}",
                      lambda h, key=key, other=other: h[key].update(data_offsets=h[other]["data_offsets"]))
        for v in bad_values:
            entry(f"{key}.data_offsets={v!r}", lambda h, key=key, v=v: h[key].update(data_offsets=v))
            entry(f"{key}.shape={v!r}", lambda h, key=key, v=v: h[key].update(shape=v))
            entry(f"{key}.dtype={v!r}", lambda h, key=key, v=v: h[key].update(dtype=v))
            entry(f"{key}={v!r}", lambda h, key=key, v=v: h.update({key: v}))
        new_shapes = [shape[::-1], [math_prod(shape)], shape + [1], [1] + shape, [d + 1 for d in shape],
                      [max(d - 1, 0) for d in shape], [-d for d in shape], [float(d) for d in shape], [0]]
        for v in new_shapes:
            entry(f"{key}.shape={v}", lambda h, key=key, v=v: h[key].update(shape=v))
        for v in ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
                  "F8_E4M3", "F8_E5M2", "C64", "f32", "float32", ""]:
            entry(f"{key}.dtype={v}", lambda h, key=key, v=v: h[key].update(dtype=v))
        for field in ("dtype", "shape", "data_offsets"):
            entry(f"{key} without {field}", lambda h, key=key, field=field: h[key].pop(field))
        entry(f"{key} with an extra field", lambda h, key=key: h[key].update(extra=[1, 2]), harmless=True)
    entry("no metadata", lambda h: h.pop("__metadata__"), harmless=True)
    for v in [{"a": 1}, [1], "pt", {"a": None}, {"a": {"b": "c"}}]:
        entry(f"__metadata__={v!r}", lambda h, v=v: h.update(__metadata__=v))
    entry("keys reordered", lambda h: [h.update({k: h.pop(k)}) for k in sorted(h, reverse=True)], harmless=True)
    entry("other metadata", lambda h: h.update(__metadata__={"format": "np", "note": ""}), harmless=True)
    entry("one tensor removed", lambda h: h.pop(names[0]))
    entry("an extra zero-size tensor", lambda h: h.update(z={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}))
    raw = json.dumps(header).encode()
    for name, r in [("a list", b"[1, 2]"), ("a string", b'"x"'), ("a number", b"7"), ("null", b"null"),
                    ("a truncated object", raw[:-1]), ("not UTF-8", b'{"\xff": 1}'), ("empty", b""),
                    ("leading spaces", b"   " + raw), ("trailing spaces", raw + b"   "),
                    ("a duplicate key", raw[:-1] + b', "' + names[0].encode() + b'": '
                     + json.dumps(header[names[0]]).encode() + b"}")]:
        out.append((f"header {name}", join_safetensors(None, body, r), name.endswith("spaces")))
    good = join_safetensors(header, body, raw)
    n = len(raw)
    for v in [0, 1, n - 1, n + 1, len(good) - 8, len(good) - 7, 2**63, 2**64 - 1]:
        out.append((f"header length {v}", v.to_bytes(8, "little") + good[8:], False))
    cuts = {0, 1, 7, 8, 9, 8 + n // 2, 8 + n, 8 + n + 1, len(good) - 1} | {rng.randrange(len(good)) for _ in range(8)}
    for cut in sorted(cuts):
        out.append((f"truncated to {cut} bytes", good[:cut], False))
    out.append(("a trailing byte", good + b"\0", False))
    for i in range(150):
        pos = 8 + rng.randrange(n)
        flipped = bytearray(good)
        flipped[pos] = rng.choice(b'0123456789,:[]{}" -.eE') if i % 2 else rng.randrange(256)
        out.append((f"header byte {pos} set to {flipped[pos]}", bytes(flipped), False))
    out.append(("unchanged", good, True))
    return out


def math_prod(shape):
    out = 1
    for d in shape:
        out *= d
    return out


STRICTER = re.compile(r"unsupported dtype|appears twice")
"""Our reader refuses, where the safetensors library accepts: dtypes it does not convert, and a header key
given twice (the library keeps one of the two silently)."""


def test_fuzzed_safetensors_headers_are_refused_or_read_like_the_library(small_safetensors, tmp_path):
    path, tensors = small_safetensors
    header, body = split_safetensors(path.read_bytes())
    mutations = header_mutations(header, body)
    assert len(mutations) > 600
    refused = 0
    for i, (name, data, harmless) in enumerate(mutations):
        f = tmp_path / f"m{i}.safetensors"
        f.write_bytes(data)
        expected = read_reference(f)
        try:
            got = read_ours(f)
        except CheckpointError as e:
            assert str(f) in str(e), (name, str(e))
            assert not harmless, (name, str(e))
            assert expected is None or STRICTER.search(str(e)), (name, str(e))
            refused += 1
            continue
        assert expected is not None, f"{name}: the safetensors library refuses it, we read {got}"
        assert same_tensors(got, expected), name
        if harmless:
            assert same_tensors(got, tensors), name
    assert refused > len(mutations) // 2
    assert sum(harmless for *_, harmless in mutations) > 10


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["w"].update(data_offsets=[h["w"]["data_offsets"][1], h["w"]["data_offsets"][0]]),
     r"'w' field 'data_offsets': expected \[begin, end\] with 0 <= begin <= end"),
    (lambda h: h["w"].update(data_offsets=[-4, 20]), r"'w' field 'data_offsets'"),
    (lambda h: h["b"].update(data_offsets=[h["b"]["data_offsets"][0] - 4, h["b"]["data_offsets"][1] - 4]),
     r"tensor 'b' \(data_offsets .*\) overlaps tensor|unused bytes"),
    (lambda h: h["w"].update(data_offsets=[0, 10**6]), r"is truncated: tensor 'w' ends at byte"),
    (lambda h: h["w"].update(shape=[3, 3]), r"tensor 'w' holds 24 bytes .* need 36"),
    (lambda h: h["w"].update(dtype="F8_E4M3"), r"tensor 'w' has unsupported dtype 'F8_E4M3'"),
    (lambda h: h["w"].pop("shape"), r"tensor 'w' lacks the field 'shape'"),
    (lambda h: h.update(w=[1]), r"tensor 'w': expected an object"),
    (lambda h: h["w"].update(shape=[2, "3"]), r"tensor 'w' field 'shape': expected a list of non-negative ints"),
])
def test_corrupt_header_errors_name_file_and_tensor(small_safetensors, tmp_path, edit, message):
    path, _ = small_safetensors
    header, body = split_safetensors(path.read_bytes())
    edit(header)
    f = tmp_path / "x.safetensors"
    f.write_bytes(join_safetensors(header, body))
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + ".*" + message):
        SafetensorsFile(f)


def test_header_length_past_the_end_and_gaps(small_safetensors, tmp_path):
    path, _ = small_safetensors
    data = path.read_bytes()
    f = tmp_path / "x.safetensors"
    f.write_bytes(len(data).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(f))} is corrupt or truncated: header length {len(data)} "
                                              f"does not fit in a file of {len(data)} bytes"):
        SafetensorsFile(f)
    f.write_bytes(data + b"\0\0")
    with pytest.raises(CheckpointError, match="2 bytes after the last tensor belong to no tensor"):
        SafetensorsFile(f)
    header, body = split_safetensors(data)
    f.write_bytes(join_safetensors([header], body))
    with pytest.raises(CheckpointError, match="header: expected a JSON object, got list"):
        SafetensorsFile(f)


def test_overlapping_offsets_refused_before_any_garbage_weight(qwen_dir, tmp_path):
    """Offsets that point model.norm.weight into another tensor's bytes used to load it as garbage."""
    _, path = qwen_dir
    shutil.copy(path / "config.json", tmp_path / "config.json")
    header, body = split_safetensors((path / "model.safetensors").read_bytes())
    norm = header["model.norm.weight"]
    size = norm["data_offsets"][1] - norm["data_offsets"][0]
    other = next(e for k, e in header.items() if k not in ("__metadata__", "model.norm.weight")
                 and e["data_offsets"][1] - e["data_offsets"][0] >= size)
    norm["data_offsets"] = [other["data_offsets"][0], other["data_offsets"][0] + size]
    (tmp_path / "model.safetensors").write_bytes(join_safetensors(header, body))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* overlaps tensor"):
        HookedRecurrentModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------- every row written exactly once


@pytest.fixture(scope="module")
def rwkv7_checkpoint(tmp_path_factory):
    """A tiny fla RWKV-7 saved whole, and its state dict and config for building shards."""
    from tests.support.fla_cpu import patch_fla_for_cpu
    from tests.models.test_rwkv7 import tiny_fla_rwkv7

    with patch_fla_for_cpu():
        ref = tiny_fla_rwkv7()
    path = tmp_path_factory.mktemp("rwkv7")
    ref.save_pretrained(path)
    return path, load_file(path / "model.safetensors")


def save_two_shards(directory, config_file, weights, second_also=()):
    """Split ``weights`` into two shards with an index; keys in ``second_also`` are written to both shards
    (the index names the first)."""
    directory.mkdir()
    shutil.copy(config_file, directory / "config.json")
    keys = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    first, second = halves
    halves[second] = halves[second] + [k for k in second_also if k not in halves[second]]
    halves[first] = halves[first] + [k for k in second_also if k not in halves[first]]
    for name, ks in halves.items():
        save_file({k: weights[k] for k in ks}, directory / name)
    weight_map = {k: name for name, ks in halves.items() for k in ks}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_rwkv7_two_shards_load_like_one_file(rwkv7_checkpoint, tmp_path):
    path, weights = rwkv7_checkpoint
    sharded = save_two_shards(tmp_path / "ok", path / "config.json", weights)
    a = dict(HookedRecurrentModel.from_pretrained(path).named_parameters())
    b = dict(HookedRecurrentModel.from_pretrained(sharded).named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rwkv7_missing_x_w_and_duplicated_x_r_are_refused(rwkv7_checkpoint, tmp_path):
    """x_r and x_w fill rows 0 and 1 of x_lerp: counting rows instead of tracking them accepted this pair
    and left row 1 uninitialised."""
    path, weights = rwkv7_checkpoint
    x_r, x_w = "model.layers.1.attn.x_r", "model.layers.1.attn.x_w"
    without_x_w = {k: v for k, v in weights.items() if k != x_w}
    both = save_two_shards(tmp_path / "both", path / "config.json", without_x_w, second_also=[x_r])
    pattern = (r"rows 0 of blocks.1.mixer.x_lerp are written twice: by key 'model.layers.1.attn.x_r' in .*"
               r"model-0000(1|2)-of-00002.safetensors and by key 'model.layers.1.attn.x_r' in .*"
               r"model-0000(1|2)-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=pattern) as info:
        HookedRecurrentModel.from_pretrained(both)
    assert "00001-of" in str(info.value) and "00002-of" in str(info.value)

    duplicated = save_two_shards(tmp_path / "dup", path / "config.json", weights, second_also=[x_r])
    with pytest.raises(CheckpointError, match=pattern):
        HookedRecurrentModel.from_pretrained(duplicated)

    missing = save_two_shards(tmp_path / "missing", path / "config.json", without_x_w)
    with pytest.raises(CheckpointError, match=r"leaves 1 parameters or buffers unset: "
                                              r"\['blocks.1.mixer.x_lerp \(rows 1 of 6\)'\]"):
        HookedRecurrentModel.from_pretrained(missing)


def test_two_keys_onto_the_same_rows_are_refused(rwkv7_checkpoint, tmp_path):
    """Older fla's x_x holds all six rows; a checkpoint with x_x and x_g both would write row 5 twice."""
    path, weights = rwkv7_checkpoint
    prefix = "model.layers.2.attn."
    weights = dict(weights)
    weights[prefix + "x_x"] = torch.stack([weights.pop(prefix + f"x_{c}")[0] for c in "rwkvag"])[:, None]
    weights[prefix + "x_g"] = weights[prefix + "x_x"][5][None].clone()
    shutil.copy(path / "config.json", tmp_path / "config.json")
    save_file(weights, tmp_path / "model.safetensors")
    pattern = (r"rows 5 of blocks.2.mixer.x_lerp are written twice: by key 'model.layers.2.attn.x_(x|g)'.* "
               r"and by key 'model.layers.2.attn.x_(x|g)'")
    with pytest.raises(CheckpointError, match=pattern):
        HookedRecurrentModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------- malformed config.json and index


def _with_config(src, dst, text):
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    (dst / "config.json").write_text(text)
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda c: json.dumps([c]), r"config.json: expected a JSON object, got list"),
    (lambda c: json.dumps(c)[:-3], r"config.json is not valid JSON"),
    (lambda c: json.dumps({k: v for k, v in c.items() if k != "hidden_size"}),
     r"config.json: missing required field 'hidden_size'"),
    (lambda c: json.dumps({**c, "hidden_size": "64"}), r"config.json: field hidden_size: expected an int, got '64'"),
    (lambda c: json.dumps({**c, "num_hidden_layers": 4.0}), r"config.json: field num_hidden_layers: expected an int"),
    (lambda c: json.dumps({**c, "vocab_size": -97}), r"config.json: the model's d_vocab: expected a positive int"),
    (lambda c: json.dumps({**c, "linear_num_key_heads": 0}), r"config.json: cannot read it as a gated_deltanet config"),
    (lambda c: json.dumps({**c, "tie_word_embeddings": "false"}),
     r"config.json: field tie_word_embeddings: expected true or false, got 'false'"),
    (lambda c: json.dumps({**c, "rms_norm_eps": "1e-6"}), r"config.json: field rms_norm_eps: expected a number"),
    (lambda c: json.dumps({**c, "layer_types": ["linear_attention"] * 3}), r"config.json: cannot read it.*layer_types"),
])
def test_malformed_config_json(qwen_dir, tmp_path, edit, message):
    _, path = qwen_dir
    config = json.loads((path / "config.json").read_text())
    _with_config(path, tmp_path, edit(config))
    with pytest.raises(CheckpointError, match="(?s)" + re.escape(str(tmp_path)) + ".*" + message):
        HookedRecurrentModel.from_pretrained(tmp_path)


def test_model_config_values_are_checked_after_reading():
    """Values a reader derives or passes through (under the test suite, beartype catches the wrong types
    first; without it this check does)."""
    from pathlib import Path

    from recurrent_lens import ModelConfig
    from recurrent_lens.models.loading import _check_model_config

    cfg = ModelConfig(architecture="gated_deltanet", d_model=8, n_layers=1, d_vocab=5, n_heads=1, d_k=4, d_v=4)
    _check_model_config(cfg, Path("c/config.json"))
    for name, value, expected in [("d_model", "8", "a positive int"), ("n_layers", 0, "a positive int"),
                                  ("d_mlp", -1, "a non-negative int"), ("d_k", True, "a positive int"),
                                  ("norm_eps", float("nan"), "a positive finite number"),
                                  ("tie_embeddings", 1, "true or false")]:
        bad = ModelConfig(**{**cfg.to_dict(), "layer_types": None})
        object.__setattr__(bad, name, value)
        with pytest.raises(CheckpointError, match=f"c/config.json: the model's {name}: expected {expected}"):
            _check_model_config(bad, Path("c/config.json"))


@pytest.mark.parametrize("index,message", [
    ("{not json", r"index .*model.safetensors.index.json is not valid JSON"),
    ("[1, 2]", r"model.safetensors.index.json: expected a JSON object, got list"),
    ('{"metadata": {}}', r"model.safetensors.index.json: no 'weight_map' field"),
    ('{"weight_map": ["a"]}', r"model.safetensors.index.json: weight_map: expected a non-empty object"),
    ('{"weight_map": {}}', r"model.safetensors.index.json: weight_map: expected a non-empty object"),
    ('{"weight_map": {"model.norm.weight": 3}}', r"weight_map: expected shard file names"),
    ('{"weight_map": {"model.norm.weight": "nowhere.safetensors"}}',
     r"model.safetensors.index.json: weight_map lists shards that are missing .*nowhere.safetensors"),
    ('{"weight_map": {"model.norm.weight": "model.safetensors", "model.ghost": "model.safetensors"}}',
     r"places 1 keys in shards that do not hold them, e.g. 'model.ghost' in .*model.safetensors"),
])
def test_malformed_index(qwen_dir, tmp_path, index, message):
    _, path = qwen_dir
    _with_config(path, tmp_path, (path / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=message):
        HookedRecurrentModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------- dtype from config.json


def test_dtype_defaults_to_the_checkpoints(qwen_dir, tmp_path):
    _, path = qwen_dir
    config = json.loads((path / "config.json").read_text())
    config.pop("dtype", None)
    _with_config(path, tmp_path, json.dumps({**config, "torch_dtype": "bfloat16"}))
    model = HookedRecurrentModel.from_pretrained(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.cfg.dtype == "bfloat16"
    reference = load_file(path / "model.safetensors")["model.norm.weight"]
    assert torch.equal(model.ln_final.weight, reference.bfloat16())
    explicit = HookedRecurrentModel.from_pretrained(tmp_path, dtype="float32")
    assert {p.dtype for p in explicit.parameters()} == {torch.float32}

    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    assert {p.dtype for p in HookedRecurrentModel.from_pretrained(tmp_path).parameters()} == {torch.float16}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert {p.dtype for p in HookedRecurrentModel.from_pretrained(tmp_path).parameters()} == {torch.float32}

    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": "float8"}))
    with pytest.raises(CheckpointError, match=r"config.json: field 'torch_dtype' names an unknown weight dtype"):
        HookedRecurrentModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16", "dtype": "bfloat16"}))
    with pytest.raises(CheckpointError, match=r"config.json: fields dtype and torch_dtype disagree"):
        HookedRecurrentModel.from_pretrained(tmp_path)

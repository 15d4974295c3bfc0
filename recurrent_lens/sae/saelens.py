"""SAELens interop: write our SAEs as SAELens directories, and read SAELens directories back.

SAELens (6.x) stores an SAE as ``cfg.json`` plus ``sae_weights.safetensors`` holding ``W_enc``
``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]`` and ``b_dec`` ``[d_in]`` (plus
``threshold`` for JumpReLU, ``b_gate``/``r_mag``/``b_mag`` instead of ``b_enc`` for Gated). Our
native directory uses the same two file names with our own keys; this module converts.

**Writing** (``sae.save_pretrained(path, format="saelens")``, :func:`save_saelens`). The SAELens SAE
works on ``x = vec(S)``, the row-major flattening of the ``[d_k, d_v]`` state (``d_in = d_k * d_v``):

- every encoder is materialised as a matrix: a linear encoder's ``E_i`` and a bilinear encoder's
  ``sum_r V_enc[i,r] W_enc[i,r]^T`` become column ``i`` of ``W_enc``;
- every decoder atom (flat, full, or factored ``sum_r V_dec[i,r] W_dec[i,r]^T``) becomes row ``i``
  of ``W_dec``;
- our centring is folded into the biases, with ``apply_b_dec_to_input = false``:
  ``b_enc <- b_enc - vec(mean) @ W_enc`` (Gated: ``b_gate`` likewise and
  ``b_mag <- b_mag - exp(r_mag) * (vec(mean) @ W_enc)``) and ``b_dec <- vec(b_dec + mean)``.

Each sparsity's module converts its own part (its ``to_saelens`` / ``from_saelens``, see
:mod:`recurrent_lens.sae.sparsities`); the built-in ones map as: ``topk`` -> ``"topk"`` (``k`` capped at ``d_sae``, as we
cap it), ``jumprelu`` -> ``"jumprelu"`` (``threshold = exp(log_threshold)``), ``gated`` with
``gate_mode="hard"`` -> ``"gated"``. BatchTopK (codes depend on the whole batch; SAELens's inference
SAEs have no such rule) and the soft Gated gate (SAELens's gate is a hard step) raise ``ValueError``.
Every preset (WriteSAE, FlatSAE, MatrixSAE, BilinearSAE, tied or not) converts.

``cfg.json`` carries SAELens's fields (``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``device``,
``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``k`` and
``rescale_acts_by_decoder_norm`` for TopK) and ``metadata`` with ``hook_name``, ``hook_head_index``
(our ``head``), ``sae_lens_version`` (the SAELens release whose format this is; SAELens reads a
config without it as a pre-6.0 one), ``sae_lens_training_version = null`` (not trained by SAELens),
every other entry of our metadata, and ``recurrent_lens``: ``d_k``, ``d_v``, the source
``architecture`` and its config.

**Reading** (:func:`recurrent_lens.sae.load` on a SAELens directory, :func:`load_saelens`): a
``standard``, ``topk``, ``jumprelu`` or ``gated`` SAELens SAE becomes a :class:`FlatSAE` on the
``[d_k, d_v]`` state whose ``encode``/``decode`` equal SAELens's on ``vec(S)``: ``standard`` (ReLU)
is JumpReLU with threshold 0 (``log_threshold = -inf``); a TopK SAE with
``rescale_acts_by_decoder_norm`` gets the decoder norms folded in; ``apply_b_dec_to_input = true``
puts ``b_dec`` into our ``mean`` buffer (``b_dec`` itself becomes zero), which subtracts it from the
input and adds it to the output exactly as SAELens does. ``d_k`` and ``d_v`` come from the
``recurrent_lens`` metadata that we write; a foreign directory needs them as arguments. Runtime
input normalisation (``normalize_activations`` other than ``"none"``) and other architectures are
refused with a ``ValueError``.

**Hook names.** SAELens's ``HookedSAETransformer`` puts an SAE's hooks directly under the hook it
replaces (``blocks.0.hook_mlp_out.hook_sae_acts_post``); we attach one SAE per head, so ours carry the
head: ``blocks.0.mixer.hook_state.saes.h{head}.hook_sae_{input,acts_pre,acts_post,recons,error}``
(see :mod:`recurrent_lens.sae.attach`). SAELens's ``hook_sae_output`` corresponds to the model's own
``blocks.0.mixer.hook_state``: hooks added there while SAEs are attached see the spliced tensor.
Our ``hook_sae_input``/``recons``/``error`` hold ``[..., d_k, d_v]`` matrices, SAELens's the
flattened ``[..., d_in]``.

Example:
    >>> import tempfile, torch
    >>> from recurrent_lens.sae import WriteSAE, load
    >>> sae = WriteSAE(4, 3, 16, k=2, metadata={"hook_name": "blocks.0.mixer.hook_state", "head": 1})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     sae.save_pretrained(d, format="saelens")
    ...     flat = load(d)
    >>> type(flat).__name__, flat.cfg.sparsity, flat.cfg.k, flat.cfg.metadata.hook_name, flat.cfg.metadata.head
    ('FlatSAE', 'topk', 2, 'blocks.0.mixer.hook_state', 1)
    >>> S = torch.randn(5, 4, 3)
    >>> bool((flat.reconstruct(S) - sae.reconstruct(S)).abs().max() < 1e-5)
    True
"""

import json
import os
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import save_file

from recurrent_lens.sae.base import SAE
from recurrent_lens.sae.presets import FlatSAE
from recurrent_lens.sae.sparsities.registry import saelens_readers, sparsities
from recurrent_lens.states.files import SafetensorsFormatError, atomic_write, read_safetensors, require_finite

__all__ = ["SAELENS_FORMAT_VERSION", "to_saelens", "save_saelens", "load_saelens", "is_saelens_config"]

SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens release whose ``cfg.json`` format :func:`save_saelens` writes (``metadata.sae_lens_version``)."""

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Metadata that only describes the SAELens file itself, not the SAE.
_FORMAT_KEYS = ("sae_lens_version", "sae_lens_training_version", "recurrent_lens", "hook_head_index")


def is_saelens_config(cfg_dict: dict[str, Any]) -> bool:
    """Whether a parsed ``cfg.json`` is SAELens's (``d_sae`` or ``d_in``) rather than ours (``n_features``).

    Example:
        >>> is_saelens_config({"architecture": "topk", "d_in": 12, "d_sae": 16}), is_saelens_config({"n_features": 16})
        (True, False)
    """
    return ("d_sae" in cfg_dict or "d_in" in cfg_dict) and "n_features" not in cfg_dict


@torch.no_grad()
def to_saelens(sae: SAE) -> tuple[dict[str, Any], dict[str, Float[torch.Tensor, "..."]]]:
    """``(cfg_dict, state_dict)`` of the SAELens SAE equal to ``sae`` on ``vec(S)`` (CPU tensors).

    Raises ``ValueError`` for sparsities SAELens cannot express (BatchTopK, soft Gated).

    Example:
        >>> from recurrent_lens.sae import WriteSAE
        >>> from recurrent_lens.sae.saelens import to_saelens
        >>> cfg, weights = to_saelens(WriteSAE(4, 3, 16, k=2))
        >>> cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["apply_b_dec_to_input"]
        ('topk', 12, 16, 2, False)
        >>> {name: tuple(t.shape) for name, t in weights.items()}
        {'W_enc': (12, 16), 'b_enc': (16,), 'W_dec': (16, 12), 'b_dec': (12,)}
    """
    cfg, part = sae.cfg, sae.sparsity
    architecture = part.saelens_architecture
    if architecture is None:
        convertible = [name for name, cls in sparsities().items() if cls.saelens_architecture is not None]
        reason = f": {part.saelens_refusal}" if part.saelens_refusal else ""
        raise ValueError(f"format='saelens': SAELens has no inference SAE for sparsity={cfg.sparsity!r}{reason}. "
                         f"Convertible sparsities: {convertible}")
    n, dtype = cfg.n_features, cfg.torch_dtype
    E = sae.encoder_atoms().reshape(n, -1)
    # The centring shift is a sum over d_in products; float64 keeps it as close to ours as the dtype allows.
    shift = (E.double() @ sae.mean.reshape(-1).double()).to(dtype)
    fields, encoder_side = part.to_saelens(shift)
    weights: dict[str, torch.Tensor] = {"W_enc": E.T, **encoder_side}
    weights["W_dec"] = sae.decoder_atoms().reshape(n, -1)
    weights["b_dec"] = (sae.b_dec + sae.mean).reshape(-1)
    weights = {name: t.detach().to("cpu", dtype).contiguous() for name, t in weights.items()}

    metadata = {key: value for key, value in cfg.metadata.items() if key != "head"}
    metadata.update(
        hook_name=cfg.metadata.get("hook_name"),
        hook_head_index=cfg.metadata.get("head"),
        sae_lens_version=SAELENS_FORMAT_VERSION,
        sae_lens_training_version=None,
        recurrent_lens={
            "d_k": cfg.d_k,
            "d_v": cfg.d_v,
            "architecture": sae.architecture,
            "cfg": {key: value for key, value in cfg.to_dict().items() if key != "metadata"},
        },
    )
    cfg_dict: dict[str, Any] = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": n,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    cfg_dict.update(fields)
    cfg_dict["metadata"] = metadata
    return cfg_dict, weights


def save_saelens(sae: SAE, path: str) -> None:
    """Write ``sae`` to directory ``path`` in SAELens's format (what ``save_pretrained(path, format="saelens")`` does).

    Example:
        >>> import json, os, tempfile
        >>> from recurrent_lens.sae import FlatSAE
        >>> from recurrent_lens.sae.saelens import save_saelens
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_saelens(FlatSAE(4, 3, 16, sparsity="jumprelu", metadata={"hook_name": "h", "head": 0}), d)
        ...     cfg = json.load(open(os.path.join(d, "cfg.json")))
        >>> cfg["architecture"], cfg["metadata"]["hook_name"], cfg["metadata"]["hook_head_index"]
        ('jumprelu', 'h', 0)
    """
    from recurrent_lens.sae.io import CFG_NAME, WEIGHTS_NAME  # io imports this module

    cfg_dict, weights = to_saelens(sae)
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, WEIGHTS_NAME), lambda tmp: save_file(weights, tmp))

    def write_cfg(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(cfg_dict, f, indent=2)

    atomic_write(os.path.join(path, CFG_NAME), write_cfg)


def _major_version(cfg_dict: dict[str, Any]) -> int:
    """SAELens major version that wrote ``cfg_dict``, 0 when unknown (SAELens reads those as pre-6.0)."""
    metadata = cfg_dict.get("metadata")
    version = cfg_dict.get("sae_lens_version")
    if not version and isinstance(metadata, dict):
        version = metadata.get("sae_lens_version")
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _upgrade_pre_6(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """A pre-6.0 SAELens config (flat keys, no ``metadata.sae_lens_version``) in the 6.x layout."""
    renames = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    old = {renames.get(key, key): value for key, value in cfg_dict.items()}
    new = dict(old)
    new.setdefault("architecture", "standard")
    new.setdefault("apply_b_dec_to_input", True)
    activation = old.get("activation_fn", "relu")
    if activation == "topk":
        new["architecture"] = "topk"
        new["k"] = (old.get("activation_fn_kwargs") or {}).get("k")
    elif activation != "relu":
        raise ValueError(f"pre-6.0 SAELens config: activation_fn: expected 'relu' or 'topk', got {activation!r}")
    if isinstance(old.get("normalize_activations"), bool) or old.get("normalize_activations") is None:
        new["normalize_activations"] = "expected_average_only_in" if old.get("normalize_activations") else "none"
    metadata_keys = ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos", "dataset_path")
    new["metadata"] = {key: old[key] for key in metadata_keys if key in old}
    return new


def load_saelens(
    path: str,
    *,
    d_k: int | None = None,
    d_v: int | None = None,
    device: str | torch.device = "cpu",
    cfg_dict: dict[str, Any] | None = None,
) -> FlatSAE:
    """Read a SAELens SAE directory as a :class:`FlatSAE` on ``[d_k, d_v]`` states.

    ``d_k``/``d_v`` default to the ones our own export records; a foreign directory needs them,
    with ``d_k * d_v == d_in``. ``cfg_dict`` skips re-reading ``cfg.json``. Errors (``ValueError``)
    name the problem before any weight is copied.

    Example:
        >>> import tempfile, torch
        >>> from recurrent_lens.sae import MatrixSAE
        >>> from recurrent_lens.sae.saelens import load_saelens
        >>> sae = MatrixSAE(4, 3, 16, rank=2, sparsity="jumprelu")
        >>> with tempfile.TemporaryDirectory() as d:
        ...     sae.save_pretrained(d, format="saelens")
        ...     flat = load_saelens(d)
        >>> codes = torch.rand(16)
        >>> bool((flat.decode(codes) - sae.decode(codes)).abs().max() < 1e-5)
        True
    """
    from recurrent_lens.sae.io import CFG_NAME, WEIGHTS_NAME  # io imports this module

    cfg_path, weights_path = os.path.join(path, CFG_NAME), os.path.join(path, WEIGHTS_NAME)
    if cfg_dict is None:
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no {CFG_NAME} in SAE directory {path!r}")
        try:
            with open(cfg_path) as f:
                cfg_dict = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON (truncated?): {e}") from e
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in SAE directory {path!r}")
    if not isinstance(cfg_dict, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg_dict).__name__}")
    if not isinstance(cfg_dict.get("metadata") or {}, dict):
        raise ValueError(f"{cfg_path}: field 'metadata': expected an object, got {cfg_dict['metadata']!r} "
                         f"({type(cfg_dict['metadata']).__name__})")
    if _major_version(cfg_dict) < 6:
        cfg_dict = _upgrade_pre_6(cfg_dict)
    missing = [name for name in ("d_in", "d_sae") if name not in cfg_dict]
    if missing:
        raise ValueError(f"{cfg_path}: missing the required field{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(repr, missing))} of a SAELens config (input size d_in, dictionary size d_sae)")
    metadata = dict(cfg_dict.get("metadata") or {})

    architecture = cfg_dict.get("architecture", "standard")
    readers = saelens_readers()
    if architecture not in readers:
        raise ValueError(f"{cfg_path}: architecture: expected one of {tuple(readers)}, got {architecture!r}")
    sparsity = readers[architecture]
    d_in, d_sae = cfg_dict.get("d_in"), cfg_dict.get("d_sae")
    for name, value in (("d_in", d_in), ("d_sae", d_sae)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{cfg_path}: {name}: expected a positive int, got {value!r}")
    normalize = cfg_dict.get("normalize_activations", "none")
    if normalize != "none":
        raise ValueError(
            f"{cfg_path}: normalize_activations: expected 'none', got {normalize!r}; a runtime input normalisation "
            "has no equivalent here (fold a constant scaling factor into the weights first, e.g. SAELens's "
            "fold_activation_norm_scaling_factor, and set it to 'none')"
        )
    reshape = cfg_dict.get("reshape_activations", "none")
    if reshape not in ("none", "hook_z"):
        raise ValueError(f"{cfg_path}: reshape_activations: expected 'none' or 'hook_z', got {reshape!r}")
    dtype = str(cfg_dict.get("dtype", "float32")).removeprefix("torch.")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{cfg_path}: dtype: expected one of {_FLOAT_DTYPES}, got {cfg_dict.get('dtype')!r}")

    ours = metadata.get("recurrent_lens") or {}
    if not isinstance(ours, dict):
        raise ValueError(f"{cfg_path}: field 'metadata.recurrent_lens': expected an object (with d_k and d_v), "
                         f"got {ours!r} ({type(ours).__name__})")
    d_k = _dim("d_k", d_k, ours.get("d_k"), cfg_path)
    d_v = _dim("d_v", d_v, ours.get("d_v"), cfg_path)
    if d_k * d_v != d_in:
        raise ValueError(
            f"d_k, d_v: expected d_k * d_v == d_in = {d_in} (from {cfg_path}), got {d_k} * {d_v} = {d_k * d_v}"
        )

    try:
        tensors = read_safetensors(weights_path)
    except (SafetensorsFormatError, OSError) as e:
        raise ValueError(f"cannot read {weights_path} (truncated or corrupt?): {e}") from e
    require_finite(tensors, weights_path)
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise ValueError(f"{weights_path}: a scaling_factor other than 1 (legacy finetuning scaling) is not supported")
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    names = ("W_enc", *sparsity.saelens_tensors(architecture), "W_dec", "b_dec")
    expected = {name: shapes.get(name, (d_sae,)) for name in names}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{name}: expected {shape}, got {tuple(tensors[name].shape)}"
             for name, shape in expected.items() if name in tensors and tuple(tensors[name].shape) != shape]
    if missing or unexpected or wrong:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {unexpected}"] if unexpected else [])
        raise ValueError(
            f"{weights_path} does not match a SAELens {architecture!r} SAE with d_in={d_in}, d_sae={d_sae}: "
            + "; ".join(problems + wrong)
        )

    torch_dtype = getattr(torch, dtype)
    t = {name: tensor.to(torch_dtype) for name, tensor in tensors.items()}
    fields, state = sparsity.from_saelens(architecture, cfg_dict, t, cfg_path)
    state.update({
        "E_enc": t["W_enc"].T.reshape(d_sae, d_k, d_v),
        "D_dec": t["W_dec"].reshape(d_sae, d_k, d_v),
        "steps_since_active": torch.zeros(d_sae, dtype=torch.int64),
    })
    b_dec = t["b_dec"].reshape(d_k, d_v)
    if cfg_dict.get("apply_b_dec_to_input", True):
        state.update(mean=b_dec, b_dec=torch.zeros_like(b_dec))
    else:
        state.update(mean=torch.zeros_like(b_dec), b_dec=b_dec)
    head = metadata.get("hook_head_index")
    metadata = {key: value for key, value in metadata.items() if key not in _FORMAT_KEYS and value is not None}
    if head is not None:
        metadata["head"] = head
    metadata["saelens_architecture"] = architecture
    sae = FlatSAE(d_k, d_v, d_sae, metadata=metadata, dtype=dtype, **fields)
    sae.load_state_dict(state)
    return sae.to(device)


def _dim(name: str, given: int | None, recorded: Any, cfg_path: str) -> int:
    if given is None and recorded is None:
        raise ValueError(
            f"{name}: {cfg_path} is a SAELens SAE on flattened vectors without recorded d_k/d_v; pass d_k= and d_v= "
            "(the state's shape, d_k * d_v == d_in) to load it"
        )
    if given is not None and recorded is not None and given != recorded:
        raise ValueError(f"{name}: {cfg_path} records {name}={recorded}, got {name}={given}")
    value = given if given is not None else recorded
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value

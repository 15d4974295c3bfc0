"""Cache interventions (the paper's §4 and App. I.4-I.6): atom erasure, installs at chosen positions, and
installs during generation.

An *install* adds ``m · r_t · k̂_t dᵀ`` to the head's state at position ``t``: the key factor is the unit
key the recurrence uses at ``t`` (``hook_k``; the paper does not state it), ``d`` a unit value-side
direction and ``r_t`` the reference magnitude at ``t``:

- ``magnitude_ref="kv"``: ``‖k_t v_tᵀ‖_F = ‖k_t‖‖v_t‖`` (``hook_k``, ``hook_v``), the paper's
  ``m · ‖k_t v_tᵀ‖`` (§4, App. I.6);
- ``magnitude_ref="write"``: ``‖W_t‖_F`` (``hook_write``, ``β_t k_t v_tᵀ``);
- ``magnitude_ref="update"``: the net update's norm (write + erase; ours).

The direction (``direction=``) is a given ``[d_v]`` vector, ``"out_proj"`` (the paper's
``v*_T = W_O[head]ᵀ W_U[T] / ‖·‖`` with ``W_O[head]`` the head's slice of the output projection) or
``"jacobian"`` (:func:`target_direction`: the output map's Jacobian, gated norm included, averaged
over the tokens).

Examples use ``toy_model, toy_task = toy.load("gdn")`` (the trained toy Gated DeltaNet and its task) and
``tiny_model``, ``tiny_sae``, ``tiny_tokens`` (a random one-layer Gated DeltaNet, a random WriteSAE on
its ``[8, 8]`` states and two random sequences; built as :mod:`recurrent_lens.analysis` shows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, SupportsIndex

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.analysis._common import branch_logits, check_sae, check_tokens, frob, native_run, unit
from recurrent_lens.analysis.logit_shift import output_jacobian, unembedding
from recurrent_lens.analysis.protocols import (
    PRESET, Direction, EraseOptions, EraseSettings, GenerationInstallOptions, GenerationInstallSettings,
    InstallOptions, InstallSettings, MagnitudeRef, choices, documented, resolve,
)
from recurrent_lens.analysis.results import InstallResult, InterventionResult
from recurrent_lens.analysis.types import ModelLike, SAELike
from recurrent_lens.states.cells import Cell, as_index, parse_cell

_DIRECTIONS = tuple(d for d in choices(Direction) if d != "given")


def out_proj_slice(model: ModelLike, hook_name: str, head: int) -> Float[Tensor, "d_model d_v"]:
    """``W_O[head]``: the head's ``d_v`` input columns of the mixer's output projection.

    The projection is the mixer's ``out_proj`` (or ``o_proj``) linear layer; Mamba-2's columns start
    after its gated-MLP slice. Refuses mixers without one.

    Example:
        >>> from recurrent_lens.analysis import out_proj_slice
        >>> out_proj_slice(toy_model, "blocks.1.mixer.hook_state", 1).shape
        torch.Size([64, 16])
    """
    site = parse_cell(model, hook_name, head, kinds=("state",))
    mixer = model.blocks[site.layer].mixer
    linear = next((m for m in (getattr(mixer, "out_proj", None), getattr(mixer, "o_proj", None))
                   if isinstance(m, torch.nn.Linear)), None)
    H, dv = model.cfg.n_heads, model.cfg.d_v
    offset = int(getattr(mixer, "d_mlp_slice", 0))
    if linear is None or linear.in_features != offset + H * dv:
        raise ValueError(f"direction: 'out_proj' needs blocks.{site.layer}.mixer ({type(mixer).__name__}) to have an "
                         f"out_proj or o_proj linear layer reading its {H} heads x {dv} values; use 'jacobian'")
    start = offset + site.head * dv
    return linear.weight.detach().float()[:, start : start + dv]


def target_direction(model: ModelLike, hook_name: str, head: int, tokens: Int[Tensor, "batch pos"] | None,
                     target: SupportsIndex | Sequence[SupportsIndex] | Int[Tensor, " n"], *,
                     method: str = "jacobian") -> Float[Tensor, "*n d_v"]:
    """The unit value-side direction ``v*_T`` that raises token ``T``'s logit when read.

    ``method="jacobian"`` (default): ``W_O^{(h)ᵀ} W_U[T]`` with ``W_O`` the output Jacobian of
    :func:`~recurrent_lens.analysis.logit_shift.output_jacobian` (gated norm included), normalised and
    averaged over the positions of ``tokens``. ``method="out_proj"``: the paper's
    ``W_O[head]ᵀ W_U[T] / ‖·‖`` (§4, App. I.5) with :func:`out_proj_slice` (``tokens`` unused, may be
    ``None``). ``target`` may be one id (returns ``[d_v]``) or several (returns ``[n, d_v]``).

    Example:
        >>> from recurrent_lens.analysis import target_direction
        >>> d = target_direction(toy_model, "blocks.1.mixer.hook_state", 0, toy_task.make_batch(4)[0], 20)
        >>> d.shape, round(float(d.norm()), 4)
        (torch.Size([16]), 1.0)
        >>> target_direction(toy_model, "blocks.1.mixer.hook_state", 0, None, [20, 21], method="out_proj").shape
        torch.Size([2, 16])
    """
    if method not in _DIRECTIONS:
        raise ValueError(f"method: expected one of {_DIRECTIONS}, got {method!r}")
    site = parse_cell(model, hook_name, head, kinds=("state",))
    single = not hasattr(target, "__len__") or (isinstance(target, Tensor) and target.dim() == 0)
    targets = [_check_token(model, target, "target")] if single else _check_tokens_list(model, target, "target")
    W_U = unembedding(model)[targets]  # [n, d_model]
    if method == "out_proj":
        d = unit(W_U @ out_proj_slice(model, hook_name, head))
    else:
        if tokens is None:
            raise ValueError("tokens: method='jacobian' averages over token positions; got None")
        tokens = check_tokens(model, tokens, 1)
        J = output_jacobian(model, tokens, site)  # [B, T, d_model, d_v]
        d = unit(unit(torch.einsum("btmv,nm->btnv", J, W_U)).mean((0, 1)))
    return d[0] if single else d


def _check_tokens_list(model: ModelLike, tokens, name: str) -> list[int]:
    values = list(torch.as_tensor(tokens).flatten().tolist()) if isinstance(tokens, Tensor) else list(tokens)
    if not values:
        raise ValueError(f"{name}: expected at least one token id, got none")
    return [_check_token(model, v, name) for v in values]


def _check_token(model: ModelLike, tok: SupportsIndex, name: str) -> int:
    """``tok`` as an ``int`` token id; refuses anything else naming ``name``."""
    index = as_index(tok, model.cfg.d_vocab)
    if index is None:
        raise ValueError(f"{name}: expected a token id in [0, {model.cfg.d_vocab}), got {tok!r}")
    return index


def _logprob_rows(logits: Tensor, target: int, conds: list[str], b: Tensor, t: Tensor) -> pd.DataFrame:
    lp = logits.log_softmax(-1)[..., target]
    lg = logits[..., target]
    frames = [pd.DataFrame({"condition": c, "batch": b.cpu().numpy(), "pos": t.cpu().numpy(),
                            "delta_logprob": (lp[i + 1] - lp[0]).cpu().numpy(),
                            "delta_logit": (lg[i + 1] - lg[0]).cpu().numpy()})
              for i, c in enumerate(conds)]
    return pd.concat(frames, ignore_index=True)


@documented("erase")
def erase_atom(model: ModelLike, sae: SAELike, hook_name: str, head: int, tokens: Int[Tensor, "batch pos"],
               atom: SupportsIndex, *, options: EraseOptions | None = None, max_positions: int = PRESET,
               control_multipliers: Sequence[float] = PRESET, target: SupportsIndex | None = None,
               readout_offset: int = PRESET, skip_positions: int = PRESET, seed: int = PRESET,
               progress: bool = False) -> InterventionResult:
    """Erase atom ``atom`` where it fires (``S_t −= a_t A``) and track one target token.

    The target defaults to the token whose log-probability the erasure lowers most in total
    (``argmax Σ_firings (log p_native − log p_erased)``). Controls: at as many non-firing positions,
    add ``m · a* · A`` for each multiplier ``m`` (``a*`` = the median firing coefficient).
    Conditions in the table: ``erase`` and ``add_x{m}``.

    This is the paper's protocol as is (App. I.4: 150 natural firings, the preferred token chosen by the
    summed log-probability drop, controls at ``m ∈ {1, 2, 4}`` times the median natural activation
    ``a*``), so it has no ``protocol`` switch.

    Args:
        atom: the SAE atom's index: any integer :func:`operator.index` accepts (e.g. a NumPy or torch
            integer scalar), not a bool.
        target: the token id to track (default: the token the erasure hurts most, see above).
        progress: show progress bars over the edited positions.

    Raises:
        ValueError: naming ``atom`` when it never fires at an eligible position (``skip_positions`` to
            ``pos − 1 − readout_offset``) or fires at all of them, which leaves no control position.

    Example:
        >>> from recurrent_lens.analysis import erase_atom
        >>> result = erase_atom(tiny_model, tiny_sae, "blocks.0.mixer.hook_state", 0, tiny_tokens, 3, max_positions=3,
        ...                     control_multipliers=(1.0, 2.0))
        >>> result.to_pandas()["condition"].value_counts(sort=False).to_dict()  # atom 3 fires 4 times
        {'erase': 3, 'add_x1': 3, 'add_x2': 3}
    """
    opts, _ = resolve("erase", "ours", dict(max_positions=max_positions, control_multipliers=control_multipliers,
                                            readout_offset=readout_offset, skip_positions=skip_positions, seed=seed),
                      options)
    max_positions, readout_offset, skip_positions, seed = (opts.max_positions, opts.readout_offset,
                                                           opts.skip_positions, opts.seed)
    site = parse_cell(model, hook_name, head, kinds=("state",))
    check_sae(sae, model)
    tokens = check_tokens(model, tokens, readout_offset + 1)
    if max_positions < 1:
        raise ValueError(f"max_positions: expected >= 1, got {max_positions}")
    atoms = sae.decoder_atoms().detach().float()
    index = as_index(atom, atoms.shape[0])
    if index is None:
        raise ValueError(f"atom: expected an index in [0, {atoms.shape[0]}), got {atom!r}")
    atom = index
    if target is not None:
        target = _check_token(model, target, "target")
    native = native_run(model, tokens, site)
    with torch.no_grad():
        codes = sae.encode(native["state"])[..., atom]
        last = tokens.shape[1] - 1 - readout_offset
        eligible = torch.zeros_like(codes, dtype=torch.bool)
        eligible[:, skip_positions : last + 1] = True
        fires = codes > 0
        fb, ft = (fires & eligible).nonzero(as_tuple=True)
        nb, nt = (~fires & eligible).nonzero(as_tuple=True)
        span = f"positions {skip_positions}..{last}"
        if len(fb) == 0:
            raise ValueError(f"atom: atom {atom} never fires on tokens at the eligible {span}")
        if len(nb) == 0:
            raise ValueError(f"atom: atom {atom} fires at every eligible position of tokens ({span}), so no "
                             f"non-firing position is left for the additive controls")
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(fb), generator=g)[:max_positions]
        fb, ft = fb[keep], ft[keep]
        coef = codes[fb, ft]
        keep = torch.randperm(len(nb), generator=g)[: len(fb)]
        nb, nt = nb[keep], nt[keep]
        a_star = float(coef.median())
        A = atoms[atom]

    erased = branch_logits(model, tokens, site, fb, ft, lambda S, idx: torch.stack([S, S - coef[idx, None, None] * A]),
                           readout_offset, progress=progress, desc="erase")
    if target is None:
        lp = erased.log_softmax(-1)
        target = int((lp[0] - lp[1]).sum(0).argmax())
    mults = [float(m) for m in opts.control_multipliers]
    control = branch_logits(model, tokens, site, nb, nt,
                            lambda S, idx: torch.stack([S] + [S + m * a_star * A for m in mults]), readout_offset,
                            progress=progress, desc="erase controls")
    rows = pd.concat([_logprob_rows(erased, target, ["erase"], fb, ft),
                      _logprob_rows(control, target, [f"add_x{m:g}" for m in mults], nb, nt)], ignore_index=True)
    settings = EraseSettings(hook_name=hook_name, head=head, atom=atom, **{**vars(opts), "control_multipliers": mults},
                             a_star=a_star)
    return InterventionResult(rows, target, settings)


def _magnitude(parts: dict[str, Tensor], ref: str) -> Tensor:
    """The reference norm ``r_t`` of each row: ``parts`` holds ``k``, ``v``, ``write`` (and ``erase``)."""
    if ref == "kv":
        return parts["k"].float().norm(dim=-1) * parts["v"].float().norm(dim=-1)
    if ref == "write":
        return frob(parts["write"].float())
    update = parts["write"] + parts["erase"] if "erase" in parts else parts["write"]
    return frob(update.float())


def _install_options(protocol: str, options: InstallOptions | None, cls: type[InstallOptions], direction: Any,
                     **given: Any) -> tuple[InstallOptions, tuple[str, ...]]:
    """Resolve the install options; ``direction`` is a tensor (``"given"``), a method name or PRESET."""
    method = direction if isinstance(direction, str) or direction is PRESET else "given"
    if method is not PRESET and method not in choices(Direction):
        raise ValueError(f"direction: expected a [d_v] tensor or one of {_DIRECTIONS}, got {method!r}")
    opts, overrides = resolve("install", protocol, dict(direction=method, **given), options, cls)
    if opts.direction == "given" and method != "given":
        raise ValueError(f"direction: expected a tensor with options.direction='given', got {direction!r}")
    return opts, overrides


@documented("install", InstallOptions)
def install(model: ModelLike, hook_name: str, head: int, tokens: Int[Tensor, "batch pos"],
            direction: Float[Tensor, " d_v"] | str = PRESET, positions: Sequence[int] | Tensor | None = None,
            *, protocol: str = "ours", options: InstallOptions | None = None, magnitude: float = PRESET,
            magnitude_ref: MagnitudeRef = PRESET, target: SupportsIndex, readout_offset: int = 1) -> InterventionResult:
    """Add ``m · r_t · k̂_t dᵀ`` at each position of ``positions`` (every sequence, one at a time) and
    measure the target's log-probability and logit at ``t + readout_offset`` (the sign test, §4 and
    App. I.5).

    ``direction`` given as a tensor is a ``[d_v]`` direction; ``"out_proj"`` and ``"jacobian"`` are computed
    for ``target`` (``"jacobian"`` averaged over ``tokens``). App. I.5 does not state the sign test's
    magnitude; the paper's preset takes App. I.6's.

    Args:
        positions: the positions to install at (required).
        target: the token whose logit is tracked.
        readout_offset: read at ``t + readout_offset``.

    Example:
        >>> from recurrent_lens.analysis import install, target_direction
        >>> tokens, _ = toy_task.make_batch(4, seed=1)
        >>> d = target_direction(toy_model, "blocks.1.mixer.hook_state", 0, tokens, 20)
        >>> res = install(toy_model, "blocks.1.mixer.hook_state", 0, tokens, d, [18, 20], target=20)
        >>> len(res.to_pandas()), res.target
        (8, 20)
        >>> paper = install(toy_model, "blocks.1.mixer.hook_state", 0, tokens, positions=[18], target=20,
        ...                 protocol="paper")
        >>> paper.settings.direction, paper.settings.magnitude_ref
        ('out_proj', 'kv')
        >>> from recurrent_lens.analysis import InstallOptions
        >>> half = install(toy_model, "blocks.1.mixer.hook_state", 0, tokens, positions=[18], target=20,
        ...                options=InstallOptions(magnitude=1.5))
        >>> half.settings.magnitude, half.settings.overrides
        (1.5, ('magnitude',))
    """
    opts, overrides = _install_options(protocol, options, InstallOptions, direction, magnitude=magnitude,
                                       magnitude_ref=magnitude_ref)
    site = parse_cell(model, hook_name, head, kinds=("state",))
    tokens = check_tokens(model, tokens, readout_offset + 1)
    target = _check_token(model, target, "target")
    if positions is None:
        raise ValueError("positions: expected the positions to install at, got None")
    d = _resolve_direction(model, hook_name, head, tokens, direction, opts.direction, [target])[0]
    pos = torch.as_tensor(positions).long().flatten()
    if len(pos) == 0 or int(pos.min()) < 0 or int(pos.max()) + readout_offset >= tokens.shape[1]:
        raise ValueError(f"positions: expected positions in [0, {tokens.shape[1] - readout_offset}), got {pos.tolist()}")
    native = native_run(model, tokens, site)
    B = tokens.shape[0]
    b = torch.arange(B).repeat_interleave(len(pos))
    t = pos.repeat(B)
    scale = opts.magnitude * _magnitude({k: native[k][b, t] for k in ("k", "v", "write", "update")}
                                           | {"erase": native["update"][b, t] - native["write"][b, t]},
                                           opts.magnitude_ref)
    X = scale[:, None, None] * unit(native["k"][b, t].float())[:, :, None] * d[None, None, :]
    logits = branch_logits(model, tokens, site, b, t, lambda S, idx: torch.stack([S, S + X[idx]]), readout_offset)
    settings = InstallSettings(protocol=protocol, hook_name=hook_name, head=head, magnitude=float(opts.magnitude),
                               magnitude_ref=opts.magnitude_ref, direction=opts.direction,
                               readout_offset=readout_offset, overrides=overrides)
    return InterventionResult(_logprob_rows(logits, target, ["install"], b, t), target, settings)


def _resolve_direction(model: ModelLike, hook_name: str, head: int, tokens: Tensor, given, method: str,
                       targets: list[int]) -> Tensor:
    """One unit direction per target ``[n, d_v]``: the given tensor (``[d_v]`` shared or ``[n, d_v]``) or
    ``method``'s."""
    if method != "given":
        return target_direction(model, hook_name, head, tokens, targets, method=method).float()
    d = torch.as_tensor(given).float()
    if d.dim() == 1:
        d = _check_direction(model, d)[None].expand(len(targets), -1)
    elif tuple(d.shape) != (len(targets), model.cfg.d_v):
        raise ValueError(f"direction: expected shape ({model.cfg.d_v},) or ({len(targets)}, {model.cfg.d_v}) "
                         f"(one per prompt), got {tuple(d.shape)}")
    if bool((d.norm(dim=-1) == 0).any()):
        raise ValueError("direction: expected nonzero vectors")
    return unit(d)


def _check_direction(model: ModelLike, direction: Tensor) -> Tensor:
    direction = torch.as_tensor(direction).float()
    if tuple(direction.shape) != (model.cfg.d_v,):
        raise ValueError(f"direction: expected shape ({model.cfg.d_v},) (d_v), got {tuple(direction.shape)}")
    if float(direction.norm()) == 0:
        raise ValueError("direction: expected a nonzero vector")
    return direction


def targets_by_rank(model: ModelLike, tokens: Int[Tensor, "batch pos"], band: tuple[int, int] = (100, 1000), *,
                    n_per_prompt: int = 1, seed: int = 0) -> Int[Tensor, "batch n"]:
    """Targets stratified by native rank: per prompt, ``n_per_prompt`` random tokens whose rank in the
    model's next-token distribution at the prompt's last position (the first generated step) lies in
    ``band``.

    The rank of a token is the number of tokens with a strictly higher logit (0 = the top-1), and
    ``band = (lo, hi)`` is inclusive. The paper's headline install class is ``(100, 1000)`` ("targets
    initially ranked 100–1000 by the unmodified model", §4 and App. I.6), which needs a vocabulary of more
    than 1,000 tokens.

    Example:
        >>> from recurrent_lens.analysis import targets_by_rank
        >>> prompts = toy_task.make_batch(3, seed=0)[0][:, :18]
        >>> targets_by_rank(toy_model, prompts, band=(17, 33)).shape
        torch.Size([3, 1])
    """
    tokens = check_tokens(model, tokens, 1)
    V = model.cfg.d_vocab
    ok = (isinstance(band, (tuple, list)) and len(band) == 2 and all(isinstance(x, int) for x in band)
          and 0 <= band[0] <= band[1] < V)
    if not ok:
        raise ValueError(f"band: expected (lo, hi) integer ranks with 0 <= lo <= hi < d_vocab = {V}, got {band!r}")
    if isinstance(n_per_prompt, bool) or not isinstance(n_per_prompt, int) or n_per_prompt < 1:
        raise ValueError(f"n_per_prompt: expected a positive integer, got {n_per_prompt!r}")
    with torch.no_grad():
        logits = model(tokens)[:, -1].float()
    rank = (logits[:, None, :] > logits[:, :, None]).sum(-1)  # [B, V]: tokens above each token
    inside = (rank >= band[0]) & (rank <= band[1])
    short = (inside.sum(-1) < n_per_prompt).nonzero().flatten().tolist()
    if short:
        raise ValueError(f"band: prompts {short} have fewer than n_per_prompt = {n_per_prompt} tokens ranked in "
                         f"{tuple(band)}")
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(inside.shape, generator=g).masked_fill(~inside.cpu(), -1.0)
    return noise.topk(n_per_prompt, dim=-1).indices.to(tokens.device)


@documented("install")
@torch.no_grad()
def install_during_generation(model: ModelLike, hook_name: str, head: int, prompt: Int[Tensor, "batch pos"],
                              direction: Float[Tensor, "*batch d_v"] | str = PRESET,
                              positions: Sequence[int] | None = None, *, protocol: str = "ours",
                              options: GenerationInstallOptions | None = None, magnitude: float = PRESET,
                              magnitude_ref: MagnitudeRef = PRESET,
                              target: SupportsIndex | Sequence[SupportsIndex] | Int[Tensor, " batch"],
                              max_new_tokens: int = PRESET) -> InstallResult:
    """Install ``m · r_t · k̂_t d̂ᵀ`` at absolute positions ``positions`` while ``model.generate`` runs.

    The hooks read ``model.positions`` on every call (the prompt, then one token per step), so
    positions may lie in the prompt or in the generated part. Returns native and installed greedy
    continuations with the target-inclusion metric, the target's log-probability and rank at the first
    step that follows the first install, per prompt.

    ``direction`` given as a tensor is ``[d_v]``, or ``[batch, d_v]`` one per prompt; ``"out_proj"`` and
    ``"jacobian"`` (averaged over the prompts) are computed per target. The paper installs at three
    consecutive positions (pass them) and reports its headline on targets ranked 100–1000 by the unmodified
    model (:func:`targets_by_rank`), with ``m ∈ {1.5, 3, 6}``.

    Args:
        positions: absolute positions to install at (required).
        target: one token id for every prompt, or one per prompt (``[batch]``).

    Example: write "first key -> value 20" into the toy GDN's recall head while it answers the queries.

        >>> from recurrent_lens.analysis import install_during_generation, target_direction
        >>> tokens, _ = toy_task.make_batch(8, seed=5)
        >>> prompt = tokens[:, : 2 + 2 * toy_task.n_pairs]  # BOS, the pairs, SEP
        >>> d = target_direction(toy_model, "blocks.1.mixer.hook_state", 0, prompt, 20)
        >>> res = install_during_generation(toy_model, "blocks.1.mixer.hook_state", 0, prompt, d, [1, 2, 3],
        ...                                 target=20, max_new_tokens=16)
        >>> s = res.summary()
        >>> s["installed_inclusion"] > s["native_inclusion"]
        True
    """
    opts, overrides = _install_options(protocol, options, GenerationInstallOptions, direction, magnitude=magnitude,
                                       magnitude_ref=magnitude_ref, max_new_tokens=max_new_tokens)
    magnitude, ref, max_new_tokens = float(opts.magnitude), opts.magnitude_ref, opts.max_new_tokens
    site = parse_cell(model, hook_name, head, kinds=("state",))
    prompt = check_tokens(model, prompt, 1)
    targets, per_prompt = _generation_targets(model, target, prompt.shape[0])
    if positions is None:
        raise ValueError("positions: expected the absolute positions to install at, got None")
    d = _prompt_directions(model, hook_name, head, prompt, direction, opts.direction, targets).to(prompt.device)
    target_t = torch.tensor(targets, device=prompt.device)
    wanted, first_read = _install_schedule(positions, prompt.shape[1], max_new_tokens)
    generation = _GenerationInstall(model, site, wanted, first_read, magnitude, ref, d)
    native = generation.run(prompt, max_new_tokens, target_t, install=False)
    installed = generation.run(prompt, max_new_tokens, target_t, install=True)
    settings = GenerationInstallSettings(protocol=protocol, hook_name=hook_name, head=head, positions=wanted,
                                         magnitude=magnitude, magnitude_ref=ref, direction=opts.direction,
                                         max_new_tokens=max_new_tokens, overrides=overrides)
    return InstallResult(_generation_rows(targets, target_t, native, installed), -1 if per_prompt else targets[0],
                         settings)


def _generation_targets(model: ModelLike, target: SupportsIndex | Sequence[SupportsIndex] | Tensor,
                        n_prompts: int) -> tuple[list[int], bool]:
    """``(one target per prompt, whether they were given per prompt)``."""
    per_prompt = hasattr(target, "__len__") and not (isinstance(target, Tensor) and target.dim() == 0)
    if per_prompt:
        targets = _check_tokens_list(model, target, "target")
        if len(targets) != n_prompts:
            raise ValueError(f"target: expected one token id or one per prompt ({n_prompts}), got {len(targets)}")
    else:
        targets = [_check_token(model, target, "target")] * n_prompts
    return targets, per_prompt


def _prompt_directions(model: ModelLike, hook_name: str, head: int, prompt: Tensor, direction: Any,
                       method: str, targets: list[int]) -> Tensor:
    """One unit direction per prompt ``[batch, d_v]``: the given one(s), or ``method``'s for the prompt's target
    (computed once per distinct target)."""
    if method == "given":
        return _resolve_direction(model, hook_name, head, prompt, direction, "given", targets)
    distinct = sorted(set(targets))
    by_target = _resolve_direction(model, hook_name, head, prompt, direction, method, distinct)
    return by_target[torch.tensor([distinct.index(x) for x in targets])]


def _install_schedule(positions: Sequence[int], prompt_len: int, max_new_tokens: int) -> tuple[list[int], int]:
    """``(the sorted distinct install positions, the position whose logits are the first to read an install)``."""
    wanted = sorted({int(p) for p in positions})
    if not wanted or wanted[0] < 0:
        raise ValueError(f"positions: expected non-negative absolute positions, got {list(positions)}")
    # An edit of S_t is read by q_t in the same call, so the logits at t are the first to change;
    # logits before P - 1 never choose a token.
    first_read = max(wanted[0], prompt_len - 1)
    if first_read > prompt_len + max_new_tokens - 2:
        raise ValueError(f"positions: the installs must happen before the last generated token "
                         f"(prompt length {prompt_len}, max_new_tokens {max_new_tokens}), got {wanted}")
    return wanted, first_read


class _Generation(NamedTuple):
    """One greedy run: the generated tokens ``[batch, max_new_tokens]``, and the target's log-probability and
    rank at the first read of the install ``[batch]``."""

    tokens: Tensor
    first_logprob: Tensor
    rank: Tensor


class _GenerationInstall:
    """The hooks of :func:`install_during_generation` and its two greedy runs (native, installed).

    Every forward keeps the head's ``k``, ``v``, ``write`` (and ``erase``) of its tokens and logs the final
    norm's output at ``first_read``; the installed run also adds ``magnitude · r_t · k̂_t dᵀ`` to the state at
    each position of ``wanted`` (positions come from ``model.positions``, so they may lie in the prompt or in
    the generated part).
    """

    def __init__(self, model: ModelLike, site: Cell, wanted: list[int], first_read: int, magnitude: float, ref: str,
                 d: Tensor) -> None:
        self.model, self.site, self.wanted, self.first_read = model, site, wanted, first_read
        self.magnitude, self.ref, self.d = magnitude, ref, d
        self.seen: dict[str, Tensor] = {}
        self.logged: list[Tensor] = []

    def run(self, prompt: Tensor, max_new_tokens: int, target: Tensor, *, install: bool) -> _Generation:
        """One greedy generation from ``prompt`` (with the installs if ``install``) and the target's score."""
        self.logged.clear()
        with self.model.hooks(fwd_hooks=self._hooks(install)):
            out = self.model.generate(prompt, max_new_tokens=max_new_tokens, stop_at_eos=False,
                                          do_sample=False)
        lp = (self.logged[0] @ unembedding(self.model).T).log_softmax(-1)
        own = lp.gather(-1, target[:, None])
        return _Generation(out[:, prompt.shape[1]:], own[:, 0], (lp > own).sum(-1))

    def _hooks(self, install: bool) -> list[tuple[str, Callable]]:
        site = self.site
        parts = [(site.hook(f"hook_{n}"), self._grab(n)) for n in ("k", "v", "write", "erase")
                 if site.hook(f"hook_{n}") in self.model.hook_dict]
        edit = [(site.hook("hook_state"), self._edit_state)] if install else []
        return parts + edit + [("ln_final.hook_normalized", self._log_logits)]

    def _grab(self, name: str) -> Callable:
        def grab(x: Tensor, hook: Any) -> Tensor:
            self.seen[name] = x
            return x
        return grab

    def _edit_state(self, x: Tensor, hook: Any) -> Tensor:
        pos = self.model.positions.tolist()
        hit = [i for i, p in enumerate(pos) if p in self.wanted]
        if not hit:
            return x
        x = x.clone()
        h = self.site.head
        for i in hit:
            parts = {name: v[:, i, h] for name, v in self.seen.items()}
            k_hat = unit(parts["k"].float())
            scale = self.magnitude * _magnitude(parts, self.ref)
            x[:, i, h] += (scale[:, None, None] * k_hat[:, :, None] * self.d[:, None, :]).to(x.dtype)
        return x

    def _log_logits(self, x: Tensor, hook: Any) -> Tensor:
        pos = self.model.positions.tolist()
        if self.first_read in pos:
            self.logged.append(x[:, pos.index(self.first_read)].float())
        return x


def _generation_rows(targets: list[int], target: Tensor, native: _Generation, installed: _Generation) -> pd.DataFrame:
    """One row per prompt: target inclusion, first-read log-probability and rank, and both continuations."""
    return pd.DataFrame({
        "target": targets,
        "native_included": (native.tokens == target[:, None]).any(-1).cpu().numpy(),
        "installed_included": (installed.tokens == target[:, None]).any(-1).cpu().numpy(),
        "native_first_logprob": native.first_logprob.cpu().numpy(),
        "installed_first_logprob": installed.first_logprob.cpu().numpy(),
        "native_rank": native.rank.cpu().numpy(),
        "installed_rank": installed.rank.cpu().numpy(),
        "native": native.tokens.tolist(),
        "installed": installed.tokens.tolist(),
    })

"""Cache interventions (specs/WRITESAE.md §4(c)): atom erasure, installs at chosen positions, and
installs during generation.

An *install* adds ``m · ‖Δ_nat,t‖_F · k̂_t dᵀ`` to the head's state at position ``t``: the key factor
is the unit key the recurrence uses at ``t`` (``hook_k``, Decision 8), ``d`` a unit value-side
direction (e.g. :func:`target_direction`), and the magnitude is relative to the native net update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import SupportsIndex

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from recurrent_lens.analysis._common import (
    as_index, branch_logits, check_sae, check_tokens, frob, native_run, parse_site, unit,
)
from recurrent_lens.analysis.logit_shift import output_jacobian, unembedding
from recurrent_lens.analysis.results import InstallResult, InterventionResult


def target_direction(model, hook_name: str, head: int, tokens: Int[Tensor, "batch pos"],
                     target: SupportsIndex) -> Float[Tensor, " d_v"]:
    """``v*_T = W_O^{(h)ᵀ} W_U[T] / ‖·‖`` averaged over the positions of ``tokens`` (``W_O`` is the
    output Jacobian of :func:`~recurrent_lens.analysis.logit_shift.output_jacobian`).

    Example:
        >>> from recurrent_lens import toy
        >>> from recurrent_lens.analysis import target_direction
        >>> model, task = toy.load("gdn", progress=False)
        >>> d = target_direction(model, "blocks.1.mixer.hook_state", 0, task.make_batch(4)[0], 20)
        >>> d.shape, round(float(d.norm()), 4)
        (torch.Size([16]), 1.0)
    """
    site = parse_site(model, hook_name, head)
    tokens = check_tokens(model, tokens, 1)
    target = _check_token(model, target, "target")
    J = output_jacobian(model, tokens, site)  # [B, T, d_model, d_v]
    v = torch.einsum("btmv,m->btv", J, unembedding(model)[target])
    return unit(unit(v).mean((0, 1)))


def _check_token(model, tok: SupportsIndex, name: str) -> int:
    """``tok`` as an ``int`` token id; refuses anything else naming ``name``."""
    index = as_index(tok, model.cfg.d_vocab)
    if index is None:
        raise ValueError(f"{name}: expected a token id in [0, {model.cfg.d_vocab}), got {tok!r}")
    return index


def _logprob_rows(logits: Tensor, target: int, conds: list[str], b: Tensor, t: Tensor) -> pd.DataFrame:
    lp = logits.log_softmax(-1)[..., target]
    lg = logits[..., target]
    frames = [pd.DataFrame({"condition": c, "batch": b.numpy(), "pos": t.numpy(),
                            "delta_logprob": (lp[i + 1] - lp[0]).numpy(), "delta_logit": (lg[i + 1] - lg[0]).numpy()})
              for i, c in enumerate(conds)]
    return pd.concat(frames, ignore_index=True)


def erase_atom(model, sae, hook_name: str, head: int, tokens: Int[Tensor, "batch pos"], atom: SupportsIndex, *,
               max_positions: int = 150, control_multipliers: Sequence[float] = (1.0, 2.0, 4.0),
               target: SupportsIndex | None = None, readout_offset: int = 1, skip_positions: int = 0,
               seed: int = 0, progress: bool = False) -> InterventionResult:
    """Erase atom ``atom`` where it fires (``S_t −= a_t A``) and track one target token.

    The target defaults to the token whose log-probability the erasure lowers most in total
    (``argmax Σ_firings (log p_native − log p_erased)``). Controls: at as many non-firing positions,
    add ``m · a* · A`` for each multiplier ``m`` (``a*`` = the median firing coefficient).
    Conditions in the table: ``erase`` and ``add_x{m}``.

    Args:
        atom: the SAE atom's index: any integer :func:`operator.index` accepts (e.g. a NumPy or torch
            integer scalar), not a bool.
        max_positions: erase at most this many firings (a seeded subsample); the controls use as many
            non-firing positions.
        control_multipliers: the multipliers ``m`` of the additive controls.
        target: the token id to track (default: the token the erasure hurts most, see above).
        readout_offset: read at ``t + readout_offset`` (>= 1).
        skip_positions: neither erase nor add at the first positions (e.g. BOS).
        seed: seeds the subsamples of firing and control positions.
        progress: show progress bars over the edited positions.

    Raises:
        ValueError: naming ``atom`` when it never fires at an eligible position (``skip_positions`` to
            ``pos − 1 − readout_offset``) or fires at all of them, which leaves no control position.

    Example:
        >>> import torch
        >>> from recurrent_lens import HookedRecurrentModel, ModelConfig
        >>> from recurrent_lens.sae import WriteSAE
        >>> cfg = ModelConfig(architecture="gated_deltanet", d_model=32, n_layers=1, d_vocab=50,
        ...                   n_heads=2, d_k=8, d_v=8, d_mlp=64)
        >>> model = HookedRecurrentModel.from_config(cfg, seed=0).eval()
        >>> _ = torch.manual_seed(0)
        >>> sae = WriteSAE(8, 8, 16, k=2)
        >>> tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
        >>> result = erase_atom(model, sae, "blocks.0.mixer.hook_state", 0, tokens, 3, max_positions=3,
        ...                     control_multipliers=(1.0, 2.0))
        >>> result.to_pandas()["condition"].value_counts(sort=False).to_dict()  # atom 3 fires 4 times
        {'erase': 3, 'add_x1': 3, 'add_x2': 3}
    """
    site = parse_site(model, hook_name, head)
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
    mults = [float(m) for m in control_multipliers]
    control = branch_logits(model, tokens, site, nb, nt,
                            lambda S, idx: torch.stack([S] + [S + m * a_star * A for m in mults]), readout_offset,
                            progress=progress, desc="erase controls")
    rows = pd.concat([_logprob_rows(erased, target, ["erase"], fb, ft),
                      _logprob_rows(control, target, [f"add_x{m:g}" for m in mults], nb, nt)], ignore_index=True)
    settings = dict(hook_name=hook_name, head=head, atom=atom, a_star=a_star, max_positions=max_positions,
                    control_multipliers=mults, readout_offset=readout_offset, skip_positions=skip_positions, seed=seed)
    return InterventionResult(rows, target, settings)


def _install_term(native: dict[str, Tensor], b: Tensor, t: Tensor, direction: Tensor, magnitude: float) -> Tensor:
    k_hat = unit(native["k"][b, t].float())
    scale = magnitude * frob(native["update"][b, t].float())
    return scale[:, None, None] * k_hat[:, :, None] * direction.float()[None, None, :]


def install(model, hook_name: str, head: int, tokens: Int[Tensor, "batch pos"],
            direction: Float[Tensor, " d_v"], positions: Sequence[int] | Tensor, *, magnitude: float = 3.0,
            target: SupportsIndex, readout_offset: int = 1) -> InterventionResult:
    """Add ``m·‖Δ_nat,t‖·k̂_t dᵀ`` at each position of ``positions`` (every sequence, one at a time) and
    measure the target's log-probability and logit at ``t + readout_offset`` (the sign test).

    Example:
        >>> from recurrent_lens import toy
        >>> from recurrent_lens.analysis import install, target_direction
        >>> model, task = toy.load("gdn", progress=False)
        >>> tokens, _ = task.make_batch(4, seed=1)
        >>> d = target_direction(model, "blocks.1.mixer.hook_state", 0, tokens, 20)
        >>> res = install(model, "blocks.1.mixer.hook_state", 0, tokens, d, [18, 20], target=20)
        >>> len(res.to_pandas()), res.target
        (8, 20)
    """
    site = parse_site(model, hook_name, head)
    tokens = check_tokens(model, tokens, readout_offset + 1)
    target = _check_token(model, target, "target")
    direction = _check_direction(model, direction)
    pos = torch.as_tensor(positions).long().flatten()
    if len(pos) == 0 or int(pos.min()) < 0 or int(pos.max()) + readout_offset >= tokens.shape[1]:
        raise ValueError(f"positions: expected positions in [0, {tokens.shape[1] - readout_offset}), got {pos.tolist()}")
    native = native_run(model, tokens, site)
    B = tokens.shape[0]
    b = torch.arange(B).repeat_interleave(len(pos))
    t = pos.repeat(B)
    X = _install_term(native, b, t, unit(direction), magnitude)
    logits = branch_logits(model, tokens, site, b, t, lambda S, idx: torch.stack([S, S + X[idx]]), readout_offset)
    return InterventionResult(_logprob_rows(logits, target, ["install"], b, t), target,
                              dict(hook_name=hook_name, head=head, magnitude=magnitude, readout_offset=readout_offset))


def _check_direction(model, direction: Tensor) -> Tensor:
    direction = torch.as_tensor(direction).float()
    if tuple(direction.shape) != (model.cfg.d_v,):
        raise ValueError(f"direction: expected shape ({model.cfg.d_v},) (d_v), got {tuple(direction.shape)}")
    if float(direction.norm()) == 0:
        raise ValueError("direction: expected a nonzero vector")
    return direction


@torch.no_grad()
def install_during_generation(model, hook_name: str, head: int, prompt: Int[Tensor, "batch pos"],
                              direction: Float[Tensor, " d_v"], positions: Sequence[int], *, magnitude: float = 3.0,
                              target: SupportsIndex, max_new_tokens: int = 20) -> InstallResult:
    """Install ``m·‖Δ_nat,t‖·k̂_t d̂ᵀ`` at absolute positions ``positions`` while ``model.generate`` runs.

    The hooks read ``model.positions`` on every call (the prompt, then one token per step), so
    positions may lie in the prompt or in the generated part. Returns native and installed greedy
    continuations with the target-inclusion metric, the target's log-probability and rank at the first
    step that follows the first install, per prompt.

    Example: write "first key -> value 20" into the toy GDN's recall head while it answers the queries.

        >>> from recurrent_lens import toy
        >>> from recurrent_lens.analysis import install_during_generation, target_direction
        >>> model, task = toy.load("gdn", progress=False)
        >>> tokens, _ = task.make_batch(8, seed=5)
        >>> prompt = tokens[:, : 2 + 2 * task.n_pairs]  # BOS, the pairs, SEP
        >>> d = target_direction(model, "blocks.1.mixer.hook_state", 0, prompt, 20)
        >>> res = install_during_generation(model, "blocks.1.mixer.hook_state", 0, prompt, d, [1, 2, 3],
        ...                                 target=20, max_new_tokens=16)
        >>> s = res.summary()
        >>> s["installed_inclusion"] > s["native_inclusion"]
        True
    """
    site = parse_site(model, hook_name, head)
    prompt = check_tokens(model, prompt, 1)
    target = _check_token(model, target, "target")
    d = unit(_check_direction(model, direction))
    wanted = sorted({int(p) for p in positions})
    if not wanted or wanted[0] < 0:
        raise ValueError(f"positions: expected non-negative absolute positions, got {list(positions)}")
    P = prompt.shape[1]
    # An edit of S_t is read by q_t in the same call, so the logits at t are the first to change;
    # logits before P - 1 never choose a token.
    first_read = max(wanted[0], P - 1)
    if first_read > P + max_new_tokens - 2:
        raise ValueError(f"positions: the installs must happen before the last generated token "
                         f"(prompt length {P}, max_new_tokens {max_new_tokens}), got {wanted}")
    seen: dict[str, Tensor] = {}
    logged: list[Tensor] = []

    def grab(name):
        def hook(x, hook):
            seen[name] = x
            return x
        return hook

    def edit_state(x, hook):
        pos = model.positions.tolist()
        hit = [i for i, p in enumerate(pos) if p in wanted]
        if not hit:
            return x
        x = x.clone()
        update = seen["write"] + seen["erase"] if "erase" in seen else seen["write"]
        for i in hit:
            k_hat = unit(seen["k"][:, i, site.head].float())
            scale = magnitude * frob(update[:, i, site.head].float())
            x[:, i, site.head] += (scale[:, None, None] * k_hat[:, :, None] * d[None, None, :]).to(x.dtype)
        return x

    def log_logits(x, hook):
        pos = model.positions.tolist()
        if first_read in pos:
            logged.append(x[:, pos.index(first_read)].float())
        return x

    hooks = [(site.hook("hook_k"), grab("k")), (site.hook("hook_write"), grab("write"))]
    if site.hook("hook_erase") in model.hook_dict:
        hooks.append((site.hook("hook_erase"), grab("erase")))
    log_hook = ("ln_final.hook_normalized", log_logits)
    results = {}
    for name, extra in (("native", []), ("installed", [(site.hook("hook_state"), edit_state)])):
        logged.clear()
        with model.hooks(fwd_hooks=hooks + extra + [log_hook]):
            out = model.generate(prompt, max_new_tokens=max_new_tokens, stop_at_eos=False)
        resid = logged[0]
        lp = (resid @ unembedding(model).T).log_softmax(-1)
        results[name] = (out[:, P:], lp[:, target], (lp > lp[:, target : target + 1]).sum(-1))
    rows = pd.DataFrame({
        "native_included": (results["native"][0] == target).any(-1).numpy(),
        "installed_included": (results["installed"][0] == target).any(-1).numpy(),
        "native_first_logprob": results["native"][1].numpy(),
        "installed_first_logprob": results["installed"][1].numpy(),
        "native_rank": results["native"][2].numpy(),
        "installed_rank": results["installed"][2].numpy(),
        "native": results["native"][0].tolist(),
        "installed": results["installed"][0].tolist(),
    })
    return InstallResult(rows, target, dict(hook_name=hook_name, head=head, positions=wanted, magnitude=magnitude,
                                            max_new_tokens=max_new_tokens))

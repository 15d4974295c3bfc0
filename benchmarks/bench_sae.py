"""WriteSAE training-step speed: recurrent_lens against the reference WriteSAE algorithm.

One step = forward (encode, TopK, decode, MSE, dead-feature bookkeeping, auxiliary loss) +
backward, fp32, no optimizer. Printed per size, best of ``--repeats`` rounds after a warm-up round
(within a round the four take turns, so that changes in the machine's load hit all alike):

- ``reference``: the reference repository's ``BilinearMatrixSAE.forward(x).loss.backward()``
  (``core/sae.py`` of the WriteSAE repository), re-implemented here step by step as it runs there:
  the encoder is the single call ``torch.einsum("irk,bkv,irv->bi", V_enc, S, W_enc)`` and the
  decoder the single call ``torch.einsum("bi,irk,irv->bkv", codes, V_dec, W_dec)`` (torch
  contracts them left to right unless ``opt_einsum`` is installed; the line ``einsum path`` says
  which), TopK is ``topk`` + ReLU + ``scatter_`` into a dense code, the dead-feature counters are
  updated with boolean indexing, and the auxiliary loss is skipped after a host-side check that no
  feature is dead (else it runs ``topk`` over the masked pre-activations and the dense decoder again);
- ``ours``: :class:`recurrent_lens.sae.WriteSAE` as ``Learner.update`` runs it (``autoencode``,
  ``update_dead_counters``, ``losses``, backward);
- ``floor``: the encoder's GEMM ``atoms @ vec(S)^T`` alone, forward only, on all the atoms at once: every TopK encoder must
  compute all ``n_f`` pre-activations, so no implementation of this encoder can beat it;
- ``dense GEMM f+b``: that GEMM's forward and dense backward (what the backward of a non-sparse
  encoder costs), for comparison.

Usage: ``python benchmarks/bench_sae.py`` (d_k = d_v = 128, n_f in {8192, 16384}, k = 32,
batch 128, 2 threads) or ``--quick`` (small sizes, seconds). ``--dead`` marks every feature that
does not fire on the batch as dead, so that both implementations run their auxiliary loss.
"""

import argparse
import math
import time

import torch

from recurrent_lens.sae import WriteSAE
from recurrent_lens.sae.training import update_dead_counters


def reference_forward_backward(params: dict[str, torch.Tensor], S: torch.Tensor, counters: torch.Tensor, k: int,
                               k_aux: int, dead_threshold: int) -> int:
    """The reference's forward + ``loss.backward()``; returns its ``n_dead`` (a host int, as there)."""
    V_enc, W_enc, V_dec, W_dec, b_enc, bias = (params[n] for n in ("V_enc", "W_enc", "V_dec", "W_dec", "b_enc", "bias"))
    batch = S.shape[0]
    S_flat = S.reshape(batch, -1)

    def topk_codes(pre: torch.Tensor, kk: int) -> torch.Tensor:
        values, indices = torch.topk(pre, k=min(kk, pre.shape[-1]), dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def decode(codes: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,irk,irv->bkv", codes, V_dec, W_dec) + bias

    pre = torch.einsum("irk,bkv,irv->bi", V_enc, S, W_enc) + b_enc
    codes = topk_codes(pre, k)
    recon = decode(codes)
    mse = (recon.reshape(batch, -1) - S_flat).pow(2).mean()
    with torch.no_grad():
        active = (codes.abs() > 0).any(dim=0)
        counters[active] = 0
        counters[~active] += 1
    dead = counters >= dead_threshold
    if dead.sum() == 0:
        aux = torch.tensor(0.0)
    else:
        masked = pre.clone()
        masked[:, ~dead] = float("-inf")
        aux_recon = decode(topk_codes(masked, min(k_aux, int(dead.sum().item()))))
        aux = (aux_recon - (S - recon.detach())).reshape(batch, -1).pow(2).mean()
    (mse + aux).backward()
    return int(dead.sum().item())


def ours_forward_backward(sae: WriteSAE, S: torch.Tensor) -> int:
    p = sae.autoencode(S)
    update_dead_counters(sae, p)
    out = sae.losses(p)
    out.loss.backward()
    return int(out.n_dead)


def best_times(fns: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Best wall time of each ``fn`` over ``repeats`` rounds, the functions taking turns within a round
    (starting with a different one each round) so that changes in the machine's load hit them alike.
    Each entry is ``(fn, tensors)``: the tensors' gradients are cleared before every call, as
    ``zero_grad(set_to_none=True)`` does."""
    best = dict.fromkeys(fns, math.inf)
    names = list(fns)
    for round_ in range(repeats + 1):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            fn, tensors = fns[name]
            for t in tensors:
                t.grad = None
            start = time.perf_counter()
            fn()
            if round_:  # the first round warms up
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def run(d: int, n_features: int, k: int, batch: int, repeats: int, dead: bool) -> None:
    torch.manual_seed(0)
    k_aux, threshold = 256, 100
    sae = WriteSAE(d, d, n_features, k=k, k_aux=k_aux, dead_threshold=threshold)
    S = torch.randn(batch, d, d)
    params = {
        "V_enc": sae.V_enc, "W_enc": sae.W_enc, "V_dec": sae.V_dec, "W_dec": sae.W_dec, "b_enc": sae.b_enc,
        "bias": sae.b_dec,
    }
    params = {name: p.detach().clone().requires_grad_(True) for name, p in params.items()}
    counters = torch.zeros(n_features, dtype=torch.int64)
    if dead:
        with torch.no_grad():
            never = ~(sae.encode(S) > 0).any(0)
        # Features that never fire on this batch stay dead on every repeat.
        sae.steps_since_active.copy_(never.long() * threshold)
        counters.copy_(sae.steps_since_active)
    atoms = torch.randn(n_features, d * d, requires_grad=True)
    x = S.reshape(batch, -1)
    n_dead_ref = reference_forward_backward(params, S, counters.clone(), k, k_aux, threshold)
    n_dead_ours = ours_forward_backward(sae, S)
    # Both compute the same step: compare their gradients once.
    ours_grads = {"V_enc": sae.V_enc, "W_enc": sae.W_enc, "V_dec": sae.V_dec, "W_dec": sae.W_dec, "b_enc": sae.b_enc,
                  "bias": sae.b_dec}
    grad_diff = max(float((params[n].grad - p.grad).abs().max() / params[n].grad.abs().max().clamp(min=1e-30))
                    for n, p in ours_grads.items())

    def floor() -> None:
        with torch.no_grad():
            atoms @ x.T

    times = best_times({
        "reference": (lambda: reference_forward_backward(params, S, counters, k, k_aux, threshold), list(params.values())),
        "ours": (lambda: ours_forward_backward(sae, S), list(sae.parameters())),
        "floor": (floor, []),
        "dense": (lambda: (x @ atoms.T).sum().backward(), [atoms]),
    }, repeats)
    t_ref, t_ours, t_floor, t_dense = (times[n] for n in ("reference", "ours", "floor", "dense"))
    print(
        f"d_k=d_v={d} n_f={n_features} k={k} B={batch} threads={torch.get_num_threads()} dead={n_dead_ref}/{n_dead_ours} "
        f"(gradients agree to {grad_diff:.1e}): "
        f"reference {t_ref:.3f}s  ours {t_ours:.3f}s  floor {t_floor:.3f}s  dense GEMM f+b {t_dense:.3f}s  "
        f"speed-up {t_ref / t_ours:.2f}x  ours/floor {t_ours / t_floor:.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (d=32, n_f in {1024, 2048})")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="*", help="n_f values (default 8192 16384)")
    parser.add_argument("--dead", action="store_true", help="features that never fire start dead (aux loss on)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        sizes, d = (1024, 2048), 32
    else:
        sizes, d = (8192, 16384), 128
    if args.sizes:
        sizes = args.sizes
    print(f"torch {torch.__version__}; einsum path: "
          f"{'opt_einsum' if torch.backends.opt_einsum.is_available() and torch.backends.opt_einsum.enabled else 'left to right'}")
    for n_features in sizes:
        run(d, n_features, 32, 128, args.repeats, args.dead)


if __name__ == "__main__":
    main()

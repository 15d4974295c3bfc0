"""WriteSAE training-step speed: recurrent_lens vs a dense implementation of the reference algorithm.

One step = encode + decode + loss (MSE; the aux loss is inactive, as while no feature is dead) +
backward, fp32, TopK. Printed per size:

- ``reference``: bilinear encoder as the einsum ``V_enc^T S W_enc`` through an
  ``(n_f, r, B, d_v)`` intermediate and a dense decode over all ``n_f`` atoms, as the reference code
  does (specs/WRITESAE.md §6);
- ``ours``: :class:`recurrent_lens.sae.WriteSAE` (chunked GEMM encoder, gather decoder);
- ``floor``: the encoder GEMM ``vec(S) @ atoms^T`` forward and backward alone, i.e. what no
  implementation of this encoder can beat.

Usage: ``python benchmarks/bench_sae.py`` (d_k = d_v = 128, n_f in {8192, 16384}, k = 32,
batch 128) or ``--quick`` (small sizes, seconds).
"""

import argparse
import time

import torch

from recurrent_lens.sae import WriteSAE


def reference_step(params: dict[str, torch.Tensor], S: torch.Tensor, k: int) -> None:
    V_enc, W_enc, V_dec, W_dec, b_enc, bias = (params[n] for n in ("V_enc", "W_enc", "V_dec", "W_dec", "b_enc", "bias"))
    # Left-to-right einsums as in the reference: V_enc^T S first, then W_enc.
    VS = torch.einsum("irp,bpq->irbq", V_enc, S)  # [n_f, r, B, d_v]
    pre = torch.einsum("irbq,irq->bi", VS, W_enc) + b_enc
    values, indices = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter(1, indices, values.relu())
    scaled = torch.einsum("bi,irp->birp", acts, V_dec)  # [B, n_f, r, d_k]
    recon = torch.einsum("birp,irq->bpq", scaled, W_dec) + bias
    (recon - S).pow(2).mean().backward()


def ours_step(sae: WriteSAE, S: torch.Tensor) -> None:
    sae(S).loss.backward()


def floor_step(atoms: torch.Tensor, S: torch.Tensor) -> None:
    (S.reshape(len(S), -1) @ atoms.T).sum().backward()


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run(d: int, n_features: int, k: int, batch: int, repeats: int) -> None:
    torch.manual_seed(0)
    sae = WriteSAE(d, d, n_features, k=k, k_aux=256)
    S = torch.randn(batch, d, d)
    params = {
        "V_enc": sae.V_enc.detach().clone().requires_grad_(True),
        "W_enc": sae.W_enc.detach().clone().requires_grad_(True),
        "V_dec": sae.V_dec.detach().clone().requires_grad_(True),
        "W_dec": sae.W_dec.detach().clone().requires_grad_(True),
        "b_enc": sae.b_enc.detach().clone().requires_grad_(True),
        "bias": sae.b_dec.detach().clone().requires_grad_(True),
    }
    atoms = torch.randn(n_features, d * d, requires_grad=True)
    t_ref = timeit(lambda: reference_step(params, S, k), repeats)
    t_ours = timeit(lambda: ours_step(sae, S), repeats)
    t_floor = timeit(lambda: floor_step(atoms, S), repeats)
    print(
        f"d_k=d_v={d} n_f={n_features} k={k} B={batch} threads={torch.get_num_threads()}: "
        f"reference {t_ref:.3f}s  ours {t_ours:.3f}s  floor {t_floor:.3f}s  "
        f"speed-up {t_ref / t_ours:.2f}x  ours/floor {t_ours / t_floor:.2f}x",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (d=32, n_f in {1024, 2048})")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        sizes, d = (1024, 2048), 32
    else:
        sizes, d = (8192, 16384), 128
    for n_features in sizes:
        run(d, n_features, 32, 128, args.repeats)


if __name__ == "__main__":
    main()

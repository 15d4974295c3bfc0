"""CUDA only: fla's Triton kernels (opt-in fast path) vs our torch chunked form vs the recurrent reference.

    RECURRENT_LENS_KERNELS is toggled inside; run on a machine with a GPU and fla + Triton installed:
    python benchmarks/gpu_kernels.py

Prints, per recurrence (GDN, DeltaNet, scalar decay as Mamba-2, per-channel decay as GLA), the max-abs
difference of outputs, final states and input gradients against the token-by-token reference (fp32,
T=300, 4 heads of 64×64), then the time of each form on one Qwen3.5-0.8B-sized layer (T=4096, 16 heads
of 128×128).
"""

import os
import time

import torch

from recurrent_lens.models import kernels, scan
from recurrent_lens.models.scan import DeltaRule, LinearRule, RecurrenceInputs, chunked_scan, recurrent_scan

CASES = {"gdn": (DeltaRule(), False, True, True), "deltanet": (DeltaRule(), False, True, False),
         "mamba2-like": (LinearRule(), False, True, True), "gla": (LinearRule(), True, False, True)}


def inputs(B, T, H, dk, dv, per_channel, beta, decay, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    d = None
    if decay:
        shape = (B, T, H, dk) if per_channel else (B, T, H)
        d = -torch.rand(*shape, generator=g, device="cuda") * 0.1
    return RecurrenceInputs(q=r(B, T, H, dk) * dk**-0.5, k=torch.nn.functional.normalize(r(B, T, H, dk), dim=-1),
                            v=r(B, T, H, dv), beta=torch.rand(B, T, H, generator=g, device="cuda") if beta else None,
                            decay=d)


def form(kind, rule, x, S0):
    os.environ["RECURRENT_LENS_KERNELS"] = kind
    return chunked_scan(rule, x, S0, 64)


def bench(fn, n=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def main() -> None:
    print("torch", torch.__version__, torch.cuda.get_device_name(), "fla ops:", kernels.fla_ops() is not None)
    for name, (rule, per_channel, beta, decay) in CASES.items():
        x = inputs(2, 300, 4, 64, 64, per_channel, beta, decay).map(lambda t: t.requires_grad_(True))
        S0 = torch.randn(2, 4, 64, 64, device="cuda")
        ref, w = recurrent_scan(rule, x, S0), None
        for kind in ("torch", "fla"):
            line = f"{name} {kind}:"
            try:
                out = form(kind, rule, x, S0)
                w = torch.randn_like(ref.o) if w is None else w
                line += (f" o {(out.o - ref.o).abs().max():.2e} S "
                         f"{(out.final_state - ref.final_state).abs().max():.2e} (|o| max {ref.o.abs().max():.2f})")
                grads = [torch.autograd.grad((r.o * w).sum() + r.final_state.sum(), [x.q, x.k, x.v]) for r in (out, ref)]
                line += f", grads {max((a - b).abs().max().item() for a, b in zip(*grads)):.2e}"
            except Exception as e:
                line += f", FAILED: {str(e)[:160]}"
            print(line, flush=True)
    with torch.no_grad():
        for name, (rule, per_channel, beta, decay) in CASES.items():
            x = inputs(1, 4096, 16, 128, 128, per_channel, beta, decay)
            S0 = torch.zeros(1, 16, 128, 128, device="cuda")
            times = {kind: bench(lambda: form(kind, rule, x, S0)) for kind in ("torch", "fla")}
            t_m = bench(lambda: scan.materialized_scan(rule, x, S0, 64), n=2)
            print(f"{name} T=4096: fla {times['fla'] * 1e3:.2f} ms, torch chunked {times['torch'] * 1e3:.2f} ms, "
                  f"every state materialised {t_m * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()

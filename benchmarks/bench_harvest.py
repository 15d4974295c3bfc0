"""Harvesting per-step states at sampled positions: memory and time against a plain forward of the same model.

    python benchmarks/bench_harvest.py               # Qwen3.5-0.8B mixer sizes, T=512, batch 8, 1 thread, fp32
    python benchmarks/bench_harvest.py --quick       # small sizes, seconds
    python benchmarks/bench_harvest.py --device cuda --dtype bfloat16

The model is a random ``gated_deltanet`` with Qwen3.5-0.8B's layer sizes (d_model 1024, 16 heads of
128 x 128, d_mlp 3584, 8 attention heads of 256 with 2 KV heads), 3 GDN layers then 1 attention layer.
The vocabulary is small (2048): it only sizes the embedding and the logits. 16 positions per sequence
come from ``sample_positions``. Prints, each measured in this run:

  (a) peak RSS that harvesting one head of layer 1 adds above a plain forward's peak / that peak
                                                                                        (target <= 0.5)
      every peak is measured in its own fresh process (VmHWM, reset after building the model and a
      small warm-up), so that one measurement's peak cannot hide another's; the old way
      (``run_with_cache`` of ``hook_state``, then slicing one head at the positions) is measured the
      same way when memory allows (``--skip-old`` skips it)
  (b) ``model.states_at(tokens, 1, positions, heads=[4])`` / ``model(tokens)``, in time  (target <= 0.75)
  (c) ``model.harvest`` of all heads of layers 1 and 2 (32 cells) / one head of those layers (head 4 of
      layer 2: the same model depth), in time                                           (target <= 1.5)
      followed by the same against one head of layer 1, and the part of that which no harvesting method
      can remove: reaching layer 2 at all (all of layer 1's output projection and MLP, layer 2's
      projections) = one head of layer 2 / one head of layer 1
Times are best of ``--repeats`` after one warm-up, the operations taking turns, under ``torch.no_grad``.
On CUDA, peaks are ``torch.cuda.max_memory_allocated`` in this process, and the states per second of a
harvest of all heads of the three GDN layers are printed too.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    QUICK, QWEN3_5_0_8B, best_of, measure_in_child, proc_status, qwen3_5_gdn, reset_peak_rss)

N_POSITIONS = 16
LAYER = 1


def sizes(quick: bool) -> dict:
    if quick:
        return dict(QUICK, T=128, batch=2, head=1)
    return dict(QWEN3_5_0_8B, T=512, batch=8, head=4)


def build(args):
    from recurrent_lens.states.cells import sample_positions

    s = sizes(args.quick)
    if args.batch is not None:
        s["batch"] = args.batch
    model = qwen3_5_gdn(s, args.vocab, dtype=args.dtype, device=args.device)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (s["batch"], s["T"]), generator=gen).to(args.device)
    positions = sample_positions(range(s["batch"]), s["T"], N_POSITIONS).to(args.device)
    return model, tokens, positions, s


def cells(layers, n_heads: int) -> list[tuple[str, int]]:
    return [(f"blocks.{layer}.mixer.hook_state", h) for layer in layers for h in range(n_heads)]


def operations(model, s: dict) -> dict:
    """Each measured operation as ``fn(tokens, positions)``; all return something small (or nothing)."""
    hook = f"blocks.{LAYER}.mixer.hook_state"
    head = s["head"]

    def old_way(tokens, positions):
        _, cache = model.run_with_cache(tokens, names_filter=hook)
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
        return cache[hook][:, :, head][rows, positions].clone()

    return {
        "forward": lambda tokens, positions: model(tokens),
        "one head": lambda tokens, positions: model.states_at(tokens, LAYER, positions, heads=[head]),
        "layer 2 one head": lambda tokens, positions: model.states_at(tokens, 2, positions, heads=[head]),
        "layers 1-2": lambda tokens, positions: model.harvest(tokens, positions, cells([1, 2], s["n_heads"])),
        "layers 0-2": lambda tokens, positions: model.harvest(tokens, positions, cells([0, 1, 2], s["n_heads"])),
        "old way": old_way,
    }


def child(args) -> None:
    """Runs in a fresh process: one operation's peak resident memory, printed as JSON."""
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, tokens, positions, s = build(args)
    fn = operations(model, s)[args.child]
    # Warm-up on a short slice: torch's lazy initialisation and the allocator's first arenas are not the
    # operation's memory, and a full-size warm-up would leave its own peak in VmHWM.
    short = min(2 * model.cfg.chunk_size, tokens.shape[1])
    fn(tokens[:1, :short], positions[:1].clamp(max=short - 1))
    before = reset_peak_rss()
    t0 = time.perf_counter()
    fn(tokens, positions)
    seconds = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"before": before, "peak": proc_status("VmHWM:"), "weights": weights, "seconds": seconds}))


def measure(args, what: str, batch: int | None = None) -> dict:
    batch = batch or args.batch
    flags = ["--threads", str(args.threads), "--vocab", str(args.vocab), "--dtype", args.dtype]
    flags += (["--quick"] if args.quick else []) + (["--batch", str(batch)] if batch else [])
    return measure_in_child(__file__, what, flags)


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def state_tensor_bytes(s: dict) -> int:
    return s["batch"] * s["T"] * s["n_heads"] * s["d_head"] ** 2 * 4  # states are fp32 whatever the weights


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_memory(args, s: dict) -> None:
    fwd = measure(args, "forward")
    one = measure(args, "one head")
    many = measure(args, "layers 1-2")
    print(f"    weights {mib(fwd['weights'])}; resident before each measured call (model, torch, warm-up): "
          f"{mib(fwd['before'])}")
    added = one["peak"] - fwd["peak"]
    print(f"(a) peak RSS harvesting adds above a plain forward's peak / that peak: "
          f"({mib(one['peak'])} - {mib(fwd['peak'])}) / {mib(fwd['peak'])} = {added / fwd['peak']:.2f}"
          "  (target <= 0.5)")
    print(f"    above the resident memory before the call: forward +{mib(fwd['peak'] - fwd['before'])}, "
          f"one head of layer {LAYER} +{mib(one['peak'] - one['before'])}, "
          f"all heads of layers 1-2 +{mib(many['peak'] - many['before'])}")
    full = state_tensor_bytes(s)
    if args.skip_old:
        print("    old way (run_with_cache of hook_state + slicing): skipped (--skip-old)")
        return
    # The old way holds every state and every erase term of the layer twice at its peak (the per-step
    # slices, then the stacked tensor), plus the forward: about 5x the state tensor at --quick sizes.
    batch = s["batch"]
    while batch > 1 and 6 * full * batch // s["batch"] > mem_available():
        batch //= 2
    need = 6 * full * batch // s["batch"]
    if need > mem_available():
        print(f"    old way (run_with_cache of hook_state + slicing): skipped, the full state tensor is {mib(full)} "
              f"and it peaks near 5x that; MemAvailable {mib(mem_available())} < {mib(need)} even at batch 1")
        return
    old = measure(args, "old way", batch)
    note = "" if batch == s["batch"] else (
        f" at batch {batch}, not {s['batch']}: MemAvailable {mib(mem_available())} < 6x the {mib(full)} state tensor")
    print(f"    old way (run_with_cache of hook_state + slicing){note}: peak {mib(old['peak'])}, "
          f"+{mib(old['peak'] - old['before'])} above the resident memory before the call "
          f"(full state tensor at that batch {mib(full * batch // s['batch'])}); one run {old['seconds']:.2f}s")


def cuda_memory(args, model, tokens, positions, ops: dict, s: dict) -> None:
    def peak(fn) -> tuple[int, int]:
        short = min(2 * model.cfg.chunk_size, tokens.shape[1])
        fn(tokens[:1, :short], positions[:1].clamp(max=short - 1))  # cuBLAS handles and workspaces
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(tokens, positions)
        torch.cuda.synchronize()
        return before, torch.cuda.max_memory_allocated()

    before, fwd = peak(ops["forward"])
    _, one = peak(ops["one head"])
    _, every = peak(ops["layers 0-2"])
    print(f"    allocated before each call (weights, tokens): {mib(before)}")
    print(f"(a) peak GPU memory harvesting adds above a plain forward's peak / that peak: "
          f"({mib(one)} - {mib(fwd)}) / {mib(fwd)} = {(one - fwd) / fwd:.2f}  (target <= 0.5)")
    print(f"    peak GPU memory, 3 layers x {s['n_heads']} heads harvested: {mib(every)}")
    full = state_tensor_bytes(s)
    if args.skip_old:
        print("    old way: skipped (--skip-old)")
    elif torch.cuda.mem_get_info()[0] < 5 * full:
        print(f"    old way: skipped, free GPU memory {mib(torch.cuda.mem_get_info()[0])} < {mib(5 * full)}")
    else:
        _, old = peak(ops["old way"])
        print(f"    old way (run_with_cache of hook_state + slicing): peak {mib(old)} (full state tensor {mib(full)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="weights' dtype; states are fp32 in any case")
    parser.add_argument("--vocab", type=int, default=2048, help="only sizes the embedding and the logits")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-old", action="store_true", help="do not measure run_with_cache + slicing")
    parser.add_argument("--batch", type=int, help="sequences per batch (default 8, or 2 with --quick)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, tokens, positions, s = build(args)
    ops = operations(model, s)
    machine = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or platform.machine()
    print(f"setting: gated_deltanet, d_model {s['d_model']}, 3 GDN layers ({s['n_heads']} heads of {s['d_head']}x"
          f"{s['d_head']}) + 1 attention layer ({s['n_attn_heads']} heads of {s['d_head_attn']}, "
          f"{s['n_kv_heads']} KV), "
          f"d_mlp {s['d_mlp']}, vocab {args.vocab} (sizes only the embedding and logits), T {s['T']}, batch "
          f"{s['batch']}, {N_POSITIONS} positions/sequence, head {s['head']} of layer {LAYER}; {args.device} "
          f"{args.dtype}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"{datetime.date.today()}, {machine}, {os.cpu_count()} CPUs")
    if cuda:
        kernels = os.environ.get("RECURRENT_LENS_KERNELS")
        print(f"    RECURRENT_LENS_KERNELS={kernels!r}: " + (
            "the unhooked path (the plain forward, layers not harvested) runs fla's kernels" if kernels == "fla" else
            "torch engine everywhere; set RECURRENT_LENS_KERNELS=fla for fla's kernels on the unhooked path"))
        cuda_memory(args, model, tokens, positions, ops, s)
        sync = torch.cuda.synchronize
    else:
        cpu_memory(args, s)
        sync = lambda: None  # noqa: E731

    names = ["forward", "one head", "layers 1-2", "layer 2 one head"] + (["layers 0-2"] if cuda else [])
    t = best_of({name: functools.partial(ops[name], tokens, positions) for name in names}, args.repeats, sync)
    t_fwd, t_one, t_many, t_two = t["forward"], t["one head"], t["layers 1-2"], t["layer 2 one head"]
    print(f"(b) states_at(layer {LAYER}, head {s['head']}) / plain forward: {t_one:.3f}s / {t_fwd:.3f}s = "
          f"{t_one / t_fwd:.2f}  (target <= 0.75)")
    print(f"(c) harvest of layers 1-2 x {s['n_heads']} heads ({2 * s['n_heads']} cells) / one head of those layers "
          f"(states_at(layer 2, head {s['head']}), the same depth): {t_many:.3f}s / {t_two:.3f}s = "
          f"{t_many / t_two:.2f}  (target <= 1.5)")
    print(f"    against one head of layer {LAYER} instead: {t_many:.3f}s / {t_one:.3f}s = {t_many / t_one:.2f}, of which "
          f"reaching layer 2 at all (layer {LAYER}'s output projection and MLP, layer 2's projections), which no "
          f"harvest can skip: states_at(layer 2, head {s['head']}) / states_at(layer {LAYER}, head {s['head']}) = "
          f"{t_two:.3f}s / {t_one:.3f}s = {t_two / t_one:.2f}")
    if cuda:
        t_every = t["layers 0-2"]
        n = 3 * s["n_heads"] * s["batch"] * N_POSITIONS
        print(f"    3 layers x {s['n_heads']} heads: {n} states in {t_every:.3f}s = {n / t_every:,.0f} states/s")


if __name__ == "__main__":
    main()

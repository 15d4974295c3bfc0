"""Speed and memory of the hookable models, each as a ratio against a baseline measured in the same run.

    python benchmarks/bench_models.py            # Qwen3.5-like GDN (d_model 512, 8 heads x 64, 4 layers, T=1024)
                                                 # plus all five architectures at the same width
    python benchmarks/bench_models.py --quick    # smaller sizes, for a smoke run

Prints:
  (a) our unhooked forward / transformers' torch-path forward on the same weights       (target <= 1.0)
  (b) run_with_cache of every state of one GDN layer / our plain forward               (target <= 3.0)
  (c) per-token decode time at context 2000 / at context 20                             (target <= 1.2)
  (d) peak resident memory while loading ~200 MB of weights / the weights' size         (target <= 1.3)
  (e) per architecture: unhooked forward / a baseline (transformers' torch path for Mamba-2, our
      token-by-token recurrent reference for the fla models, whose kernels cannot run on CPU), and
      per-token decode at context 2000 / 20                                             (target <= 1.2)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# the repository root, whatever the working directory: the reference builders are shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def qwen_like(d_model: int, n_heads: int, d_head: int, n_layers: int, vocab: int):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from tests.support.helpers import patch_transformers_qwen3_5

    patch_transformers_qwen3_5()
    layer_types = ["linear_attention"] * (n_layers - 1) + ["full_attention"]
    cfg = Qwen3_5TextConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=2, head_dim=d_head, linear_num_key_heads=n_heads,
        linear_num_value_heads=n_heads, linear_key_head_dim=d_head, linear_value_head_dim=d_head,
        layer_types=layer_types, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True},
    )
    torch.manual_seed(0)
    return Qwen3_5ForCausalLM(cfg).eval()


def decode_time(model, context: int, steps: int = 20) -> float:
    prompt = torch.randint(0, model.cfg.d_vocab, (1, context))
    with torch.no_grad():
        cache = model.make_cache()
        model(prompt, cache=cache)
        token = prompt[:, -1:]

        def run():
            branch = cache.clone()
            for _ in range(steps):
                model(token, cache=branch)

        return best_of(run) / steps





def main() -> None:
    from tests.support.helpers import PEAK_RSS_SCRIPT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_grad_enabled(False)
    from recurrent_lens import HookedRecurrentModel

    T = 256 if args.quick else 1024
    ref = qwen_like(128 if args.quick else 512, 2 if args.quick else 8, 64, 4, 1000)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = HookedRecurrentModel.from_pretrained(d)
    tokens = torch.randint(0, 1000, (1, T))
    t_ref = best_of(lambda: ref(tokens))
    t_ours = best_of(lambda: ours(tokens))
    t_cache = best_of(lambda: ours.run_with_cache(tokens, names_filter="blocks.0.mixer.hook_state"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={T}, batch 1")
    print(f"(a) unhooked forward / transformers torch path: {t_ours:.3f}s / {t_ref:.3f}s = {t_ours / t_ref:.2f}"
          "  (target <= 1.0)")
    print(f"(b) run_with_cache(every state of one GDN layer) / plain forward: {t_cache:.3f}s / {t_ours:.3f}s = "
          f"{t_cache / t_ours:.2f}  (target <= 3.0)")
    short, long = decode_time(ours, 20), decode_time(ours, 2000 if not args.quick else 500)
    print(f"(c) per-token decode at context {2000 if not args.quick else 500} / at context 20: "
          f"{long * 1e3:.2f}ms / {short * 1e3:.2f}ms = {long / short:.2f}  (target <= 1.2; the attention layer's "
          "KV cache grows with context)")

    big = qwen_like(768 if not args.quick else 256, 8, 64, 6, 32000 if not args.quick else 8000)
    with tempfile.TemporaryDirectory() as d:
        big.save_pretrained(d)
        del big
        out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, d], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    weights, peak = map(int, out.stdout.split())
    print(f"(d) peak RSS while loading / weights: {peak / 2**20:.1f} MiB / {weights / 2**20:.1f} MiB = "
          f"{peak / weights:.2f}  (target <= 1.3)")
    print(f"(e) all five architectures, d_model {128 if args.quick else 512}, {2 if args.quick else 8} heads, 4 layers:")
    for arch in ARCH_CONFIGS:
        bench_architecture(arch, T, args.quick)


def arch_config(arch: str, quick: bool):
    from recurrent_lens import ModelConfig

    d, H = (128, 2) if quick else (512, 8)
    common = dict(d_model=d, n_layers=4, d_vocab=1000, n_heads=H, chunk_size=64)
    if arch == "gated_deltanet":
        return ModelConfig(architecture=arch, d_k=64, d_v=64, d_mlp=2 * d, options={"layout": "fla"}, **common)
    if arch == "delta_net":
        return ModelConfig(architecture=arch, d_k=64, d_v=64, d_mlp=2 * d, **common)
    if arch == "gla":
        return ModelConfig(architecture=arch, d_k=32, d_v=64, d_mlp=2 * d, **common)
    if arch == "rwkv7":
        return ModelConfig(architecture=arch, d_k=64, d_v=64, d_mlp=4 * d, mlp="relu2", norm="layer", norm_eps=1e-5,
                           conv_kernel=0, **common)
    raise ValueError(arch)


def mamba2_pair(quick: bool):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from recurrent_lens import HookedRecurrentModel

    d, H = (128, 4) if quick else (512, 16)
    cfg = Mamba2Config(hidden_size=d, num_hidden_layers=4, vocab_size=1000, num_heads=H, head_dim=64, state_size=64,
                       n_groups=1, expand=2, tie_word_embeddings=True, chunk_size=64)
    torch.manual_seed(0)
    ref = Mamba2ForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        return ref, HookedRecurrentModel.from_pretrained(d)


ARCH_CONFIGS = ["gated_deltanet", "mamba2", "delta_net", "gla", "rwkv7"]


def bench_architecture(arch: str, T: int, quick: bool) -> None:
    import recurrent_lens.models.mixer as mixer_module
    from recurrent_lens import HookedRecurrentModel
    from recurrent_lens.models.scan import recurrent_scan

    tokens = torch.randint(0, 1000, (1, T))
    if arch == "mamba2":
        ref, model = mamba2_pair(quick)
        baseline, label = best_of(lambda: ref(tokens)), "transformers torch path"
    else:
        model = HookedRecurrentModel.from_config(arch_config(arch, quick), seed=0).eval()
        fast_scan = mixer_module.scan
        mixer_module.scan = lambda rule, x, S0, **kw: recurrent_scan(rule, x, S0, writes=kw.get("writes"),
                                                                      keep_states=kw.get("keep_states", False))
        try:
            baseline, label = best_of(lambda: model(tokens), repeats=1), "our recurrent reference"
        finally:
            mixer_module.scan = fast_scan
    ours = best_of(lambda: model(tokens))
    long_ctx = 500 if quick else 2000
    short, long = decode_time(model, 20), decode_time(model, long_ctx)
    print(f"    {arch:15s} forward {ours:.3f}s / {label} {baseline:.3f}s = {ours / baseline:.2f};"
          f"  decode {long * 1e3:.2f}ms @ctx {long_ctx} / {short * 1e3:.2f}ms @ctx 20 = {long / short:.2f}")


if __name__ == "__main__":
    main()

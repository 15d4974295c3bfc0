"""``recurrent-lens harvest``: sampled states of many cells of a checkpoint written to a state store."""

from __future__ import annotations

import argparse

from recurrent_lens.cli.args import add_real_model_args, non_negative_int, positive_int
from recurrent_lens.cli.common import check_out, load_checkpoint, locked, run_failure, selected_cells, token_source
from recurrent_lens.states.store import harvest_to_store

NAME = "harvest"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME, help="write sampled states of many cells of a checkpoint to a state store",
        description="Run a checkpoint over a dataset and write the states (or writes) of every cell at sampled "
                    "positions to sharded safetensors under --out with a JSON manifest; a killed run resumes where "
                    "it stopped. `recurrent-lens train-sae --states DIR` trains from it.")
    add_real_model_args(p, required=True)
    p.add_argument("--hook", default=None, help="a state or write hook to read, e.g. blocks.9.mixer.hook_state")
    p.add_argument("--out", required=True, help="store directory (checked writable before any work)")
    p.add_argument("--sequences", type=positive_int, default=None,
                   help="stop after this many sequences (default: the whole dataset)")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the stored states (default: float32)")
    p.add_argument("--shard-size", type=positive_int, default=2048,
                   help="states per shard file and cell; up to this many states per cell wait in memory "
                        "before a flush (default: 2048, 128 MiB per cell of 128x128 fp32 states)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sampled positions")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    return p


def run(args, parser) -> int:
    check_out(parser, args.out)
    model = load_checkpoint(args, parser)
    cells = selected_cells(args, parser, model)
    source = token_source(args, parser, model)
    try:
        store = locked(parser, lambda: harvest_to_store(
            model, cells, source, args.out, positions_per_seq=args.positions_per_seq,
            skip_positions=args.skip_positions, batch_size=args.model_batch_size, shard_size=args.shard_size,
            dtype=args.store_dtype, seed=args.seed, max_sequences=args.sequences, progress=not args.no_progress,
            model_name=args.model))
    except OSError as e:  # a full disk, say: the store keeps what its manifest names, and a rerun resumes
        return run_failure(parser, str(e))
    print(store)
    for cell in store.cells:
        print(f"  {cell.name}: {store.count(cell)} states")
    return 0

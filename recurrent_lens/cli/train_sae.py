"""``recurrent-lens train-sae``: SAEs on a checkpoint's cells (from a dataset or a state store, also under
torchrun), or one SAE on a toy's hook."""

from __future__ import annotations

import argparse
import datetime
import os
import re
from dataclasses import asdict

import torch
import torch.distributed as dist

from recurrent_lens import toy
from recurrent_lens.cli.args import (
    add_model_args, add_real_model_args, add_sae_args, non_negative_float, non_negative_int, positive_float,
    positive_int,
)
from recurrent_lens.cli.common import (
    check_k, check_out, check_site, hook_names, load_checkpoint, locked, refuse_given, run_failure, selected_cells,
    token_source, toy_site, train_toy_sae, wandb_config,
)
from recurrent_lens.sae import TrainConfig
from recurrent_lens.sae.distributed import CollectiveError, collective
from recurrent_lens.sae.trainer import MultiCellTrainer
from recurrent_lens.sae.training import write_json
from recurrent_lens.states.files import DirectoryLock
from recurrent_lens.states.store import StateStore

NAME = "train-sae"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME, help="train SAEs on a checkpoint's (or a toy's) state hooks and save them",
        description="With --model and --dataset: one SAE per cell (hook, head) of a checkpoint, all cells fed by the "
                    "same model passes over a text or token dataset; writes OUT/{hook}.h{head}/ (an SAE directory "
                    "with train_log.json) per cell. With --states: the same from a state store written by "
                    "`recurrent-lens harvest`. With neither: one SAE on a toy model's hook, written to --out. Under "
                    "torchrun the SAEs train data-parallel (or --distribute-cells).")
    add_model_args(p)
    add_sae_args(p)
    p.add_argument("--out", required=True, help="output directory (checked writable before any work)")
    add_real_model_args(p)
    p.add_argument("--states", default=None, metavar="DIR",
                   help="train from a state store (recurrent-lens harvest, or the reference layer_L/head_H.npy "
                        "layout) instead of running a model")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="states per SAE step, the global batch across ranks (default: 256 real, the toy recipe's "
                        "for toys)")
    p.add_argument("--buffer-size", type=positive_int, default=4096,
                   help="states held per cell in the shuffling buffer (default: 4096)")
    p.add_argument("--val-sequences", type=non_negative_int, default=0,
                   help="sequences held out for validation metrics: the first ones of --dataset, or for a toy the "
                        "last of its --train-sequences (default: 0)")
    p.add_argument("--max-nmse", type=non_negative_float, default=TrainConfig.max_nmse, metavar="BOUND",
                   help="stop when a batch's reconstruction error exceeds BOUND times its mean square, a run that "
                        f"diverged but stayed finite (default: {TrainConfig.max_nmse:g}; 0: never)")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="write a resumable checkpoint every this many steps (default: 0, only at the end)")
    p.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="log training (mse, l0, dead, explained variance, validation) to this Weights & Biases "
                        "project (default: no logging)")
    p.add_argument("--wandb-run-name", default=None, metavar="NAME",
                   help="the Weights & Biases run's name (default: wandb picks one; needs --wandb)")
    p.add_argument("--distribute-cells", action="store_true",
                   help="under torchrun, each rank trains its own subset of the cells on all of the data "
                        "(default: data-parallel, every rank trains every cell on its share)")
    p.add_argument("--timeout", type=positive_float, default=600, metavar="SECONDS",
                   help="under torchrun, how long a rank waits for its peers in the start-up rendezvous and in "
                        "every collective before the run ends with an error (default: 600)")
    return p


def run(args, parser) -> int:
    real = args.model is not None or args.states is not None
    if not real:
        toy_site(args)
    check_k(parser, args)
    if args.wandb_run_name is not None and args.wandb is None:
        parser.error("argument --wandb-run-name: names a Weights & Biases run, which needs --wandb PROJECT")
    if real:
        return _train_real(args, parser)
    check_out(parser, args.out)
    with locked(parser, DirectoryLock(args.out, "--out").acquire):
        return _train_toy(args, parser)


REAL_ONLY = ("dataset", "text_field", "split", "context_length", "sample_by", "dtype", "layers", "hook_kind", "heads",
             "device", "positions_per_seq", "skip_positions", "model_batch_size", "checkpoint_every",
             "distribute_cells", "timeout")
"""Options of a --model/--dataset or --states run that a toy SAE, trained on its probe recipe, has no use for."""


def _train_toy(args, parser) -> int:
    refuse_given(parser, args, REAL_ONLY, "applies to --model/--dataset or --states runs; a toy SAE (--arch) trains "
                 "on the toy's probe recipe, set with --steps, --lr, --batch-size, --buffer-size, --val-sequences, "
                 "--train-sequences and the SAE's options")
    progress = not args.no_progress
    model, task = toy.load(args.arch, progress=progress)
    check_site(parser, model, args.hook, args.head)
    recipe = {"buffer_size": args.buffer_size, "val_sequences": args.val_sequences, "max_nmse": args.max_nmse}
    if args.batch_size is not None:
        recipe["batch_size"] = args.batch_size
    try:
        sae, log = train_toy_sae(args, model, task, progress, **recipe)
    except ValueError as e:  # a setting the toy's data cannot meet (val_sequences, buffer below the batch)
        parser.error(re.sub(r"TrainConfig\.(\w+)", lambda m: "argument --" + m.group(1).replace("_", "-"), str(e)))
    sae.cfg.metadata.update(toy=args.arch)
    sae.save_pretrained(args.out)
    write_json(os.path.join(args.out, "train_log.json"), asdict(log))
    last = log.train[-1] if log.train else {}
    print(f"{sae}\n  explained variance {last.get('explained_variance', float('nan')):.3f}\nsaved {args.out}")
    return 0


def _init_distributed(args) -> tuple[int, int]:
    """``(rank, world_size)``; under torchrun (``WORLD_SIZE`` > 1) the process group is initialised here,
    with NCCL on CUDA and gloo on CPU, and ``--device cuda`` becomes each rank's local GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = (args.device or "cpu").startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        # without a timeout a stopped peer leaves every other rank waiting in its next collective
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _train_config(args, **overrides):
    return TrainConfig(n_steps=args.steps, batch_size=args.batch_size or 256, lr=args.lr, lr_min=args.lr / 10,
                       architecture=args.sae_type, n_features=args.n_features, k=args.k,
                       positions_per_seq=args.positions_per_seq, skip_positions=args.skip_positions,
                       model_batch_size=args.model_batch_size, buffer_size=args.buffer_size,
                       checkpoint_every=args.checkpoint_every, max_nmse=args.max_nmse, seed=args.seed,
                       progress=not args.no_progress,
                       **wandb_config(args), **overrides)


def _train_real(args, parser) -> int:
    """``train-sae --model/--dataset`` or ``--states``: one SAE per cell, optionally under torchrun."""
    if args.states is not None and args.model is not None:
        parser.error("argument --states: train either from a state store or from --model/--dataset, not both")
    if args.model is not None and args.dataset is None:
        parser.error("argument --dataset: required with --model")
    check_out(parser, args.out)
    try:
        rank, world = _init_distributed(args)
    except (RuntimeError, ValueError) as e:  # the rendezvous: a peer never arrived, a bad address or port
        return _distributed_failure(parser, args, f"joining the process group failed: {e}")
    try:
        code = _train_cells(args, parser, rank, world)
        if dist.is_initialized():
            # every rank tears down together: a rank leaving while its peer still works (rank 0 writing and
            # printing) aborted now and then at exit ("terminate called without an active exception")
            with collective("barrier at the end of training"):
                dist.barrier()
        return code
    except CollectiveError as e:
        return _distributed_failure(parser, args, str(e))
    except OSError as e:  # a full disk, say: checkpoints are whole files, and a rerun resumes from the last
        return run_failure(parser, str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _distributed_failure(parser, args, message: str) -> int:
    """Report a failed rendezvous or collective with the ``--timeout`` in force; exit status 1."""
    return run_failure(parser, f"{message}\n  (--timeout {args.timeout:g} s; the last checkpoint under {args.out}, "
                                f"if any, is intact: rerun the same command to resume from it)")


def _train_cells(args, parser, rank: int, world: int) -> int:
    mode = None if world == 1 else ("cells" if args.distribute_cells else "data")
    try:
        cfg = _train_config(args)
    except ValueError as e:
        parser.error(str(e))
    if cfg.buffer_size < cfg.batch_size:
        parser.error(f"argument --buffer-size: expected at least --batch-size {cfg.batch_size}, got {cfg.buffer_size}")
    if args.states is not None:
        try:
            store = StateStore(args.states)
        except (OSError, ValueError) as e:
            parser.error(f"argument --states: {e}")
        hooks = hook_names(args)
        cells = [c for c in store.cells if (not hooks or c.hook_name in hooks)
                 and (args.heads is None or c.head in args.heads)]
        if not cells:
            parser.error(f"arguments --hook/--layers/--heads: select none of the store's cells "
                         f"{[c.name for c in store.cells]}")
        for cell in cells:
            if store.count(cell) < cfg.batch_size:
                parser.error(f"argument --batch-size: expected at most the {store.count(cell)} states stored for "
                             f"{cell.name} in --states {args.states}, got {cfg.batch_size}")
        trainer = locked(parser, lambda: MultiCellTrainer(None, cells, store, cfg, out_dir=args.out,
                                                           distributed=mode, device=args.device or "cpu"))
    else:
        model = load_checkpoint(args, parser)
        cells = selected_cells(args, parser, model)
        share = {"rank": rank, "world_size": world} if mode == "data" else {}
        val = None
        if args.val_sequences:
            held_out = token_source(args, parser, model, max_sequences=args.val_sequences)
            val = torch.stack(list(held_out))
            share["skip"] = -(-args.val_sequences // share.get("world_size", 1))
        source = token_source(args, parser, model, **share)
        trainer = locked(parser, lambda: MultiCellTrainer(model, cells, source, cfg, out_dir=args.out,
                                                           val_tokens=val, distributed=mode))
    if trainer.step:
        print(f"resuming {args.out} at step {trainer.step}")
    saes = trainer.train()
    if rank == 0 or mode == "cells":
        for cell, learner in trainer.learners.items():
            last = learner.log.train[-1] if learner.log.train else {}
            print(f"{cell.name}: {saes[cell]}\n  mse {last.get('mse', float('nan')):.4g}, explained variance "
                  f"{last.get('explained_variance', float('nan')):.3f}, dead {last.get('dead', 0)}")
        print(f"saved {len(trainer.cells)} SAE(s) under {args.out}")
    return 0

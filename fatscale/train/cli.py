"""The trainer's command line: one process per rank, under torchrun or a launcher.

    torchrun --nproc-per-node N -m fatscale.train RECIPE [--set key=value ...]

SIGTERM (torchrun passes it on, and the kernel sends it when torchrun dies) makes the ranks save
and stop; exit 143 then, 1 on divergence or a refused recipe, 75 when a rank stalled
(fatscale.train.watchdog), 0 when training is complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from fatscale.config import add_recipe_arguments

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fatscale.train", description="Train a recipe (one process per rank).")
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    # torchrun passes SIGTERM on to the ranks (and kills them 30 s later): save and stop. The
    # same when torchrun itself dies, even by SIGKILL (the kernel sends the signal).
    from fatscale.lifetime import end_with_parent

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    end_with_parent(signal.SIGTERM)

    from fatscale.checkpoint import resume
    from fatscale.config import RecipeError, dump, load_recipe_or_exit
    from fatscale.preflight import check_world
    from fatscale.data.manifest import load_manifest
    from fatscale.run_lock import RunDirBusy
    from fatscale.train.logs import setup_logging
    from fatscale.weights import SourceError

    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    from fatscale.train.trainer import Interrupted, TrainingDiverged, train  # torch, DeepSpeed, DALI, timm

    try:
        check_world(recipe, load_manifest(recipe.data.shards), int(os.environ.get("WORLD_SIZE", "1")), args.recipe)
        train(recipe, dump(recipe), stop)
    except Interrupted as e:
        log.info("%s; run the same command again to resume", e)
        sys.exit(128 + signal.SIGTERM)
    except TrainingDiverged as e:
        log.error("%s", e)
        sys.exit(1)
    except (RecipeError, RunDirBusy, resume.ResumeMismatch, SourceError) as e:  # the same on every rank: said once
        if rank == 0:
            log.error("%s", e)
        sys.exit(1)

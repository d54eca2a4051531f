"""Command line: ``python cli.py {fit,validate,test,predict} --config configs/...`` (also ``robust``).

LightningCLI with subclass mode for model and data: the data module's class count, channels, image
size and normalization are linked into the model, a ModelCheckpoint (best ``val/acc`` and last) and
a TensorBoardLogger under ``runs/`` are defaults that a config can change, and devices,
accelerator, precision and strategy pass straight to the Trainer.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from datamodules import DataNotFoundError, ImageDataModule
from lightning_modules import StandardClassifier

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}


def fail(message: str) -> None:
    """Print one clear error line and exit with status 2 (what argparse does for bad usage)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def find_run_checkpoint(which: str, run_dir: Path) -> str:
    """Newest ``last.ckpt`` (``which="last"``) or ``best-*.ckpt`` of the runs in ``run_dir``.

    A new process logs to a new ``version_N`` folder, so Lightning's own ``"last"``/``"best"``
    would find nothing there and silently evaluate an untrained model; this finds the checkpoint
    that the latest ``fit`` of the same config wrote.
    """
    pattern = "last.ckpt" if which == "last" else "best-*.ckpt"
    found = sorted(
        run_dir.glob(f"version_*/checkpoints/{pattern}"), key=lambda p: p.stat().st_mtime
    )
    if not found:
        fail(
            f"ckpt_path {which!r}: no {pattern} under {run_dir}/version_*/checkpoints; "
            "run fit with this config first, or give the path of a .ckpt file"
        )
    print(f"ckpt_path {which!r} is {found[-1]}", file=sys.stderr)
    return str(found[-1])


def logger_run_dir(trainer_config) -> Path:
    """``save_dir/name`` of the configured TensorBoardLogger (``runs/default`` otherwise)."""
    logger = trainer_config.get("logger")
    init_args = getattr(logger, "init_args", None) or {}
    return Path(init_args.get("save_dir") or "runs") / str(init_args.get("name") or "default")


def check_checkpoint(path: str) -> None:
    """Fail unless ``path`` is a readable Lightning checkpoint (or ``hpc``/``registry``)."""
    if path in {"hpc", "registry"} or path.startswith("registry:") or "://" in path:
        return  # resolved by Lightning (remote paths through fsspec)
    if not Path(path).is_file():
        fail(f"ckpt_path {path!r} does not exist (give a .ckpt file written by fit, or 'last')")
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError:  # mmap needs the zip format; older checkpoints are plain pickles
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        fail(f"ckpt_path {path!r} is not a checkpoint torch can read ({type(err).__name__})")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        fail(f"ckpt_path {path!r} is not a Lightning checkpoint (it has no 'state_dict')")


class RobustCLI(LightningCLI):
    """LightningCLI with the data-to-model links, a default checkpoint and early, clear errors."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102 (LightningCLI hook)
        for name in ("num_classes", "in_channels", "image_size", "mean", "std"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser, args) -> None:
        """Parse, then resolve and check ``ckpt_path`` before Lightning reads hyperparameters from it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in {"last", "best"}:
            ckpt_path = config.ckpt_path = find_run_checkpoint(
                ckpt_path, logger_run_dir(config.trainer)
            )
        if ckpt_path:
            check_checkpoint(str(ckpt_path))

    def instantiate_classes(self) -> None:  # noqa: D102
        try:
            super().instantiate_classes()
        except (ValueError, DataNotFoundError) as err:
            fail(str(err))


def main(args: list[str] | None = None) -> RobustCLI | None:
    """Run the CLI on ``args`` (``sys.argv`` when None) and return it.

    ``compare`` is the one subcommand that is not LightningCLI's own: it runs fit and test for
    several configs through this same CLI and writes a report (see :mod:`compare`).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:
        from compare import compare

        compare(argv[1:])
        return None
    try:
        return RobustCLI(
            StandardClassifier,
            ImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
        )
    except DataNotFoundError as err:
        fail(str(err))


def console() -> None:
    """Entry point of the ``robust`` console script (returns nothing, so the exit status is 0)."""
    main()


if __name__ == "__main__":
    console()

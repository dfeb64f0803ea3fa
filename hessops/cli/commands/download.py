"""``hessops download``: torchvision fetches a dataset's files (:func:`hessops.zoo.data.download_dataset`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hessops.zoo.registry import DOWNLOADABLE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset and where to put it."""
    parser.add_argument("name", choices=DOWNLOADABLE, help="the dataset")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where to put it")


def run(args: argparse.Namespace) -> None:
    """Fetch, then say where the files are."""
    from hessops.zoo.data import download_dataset

    print(f"{args.name} is in {download_dataset(args.name, args.data_dir)}")

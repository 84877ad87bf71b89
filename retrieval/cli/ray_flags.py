"""The ``--ray`` flags of the commands that embed images (build-index, add): one ``ray`` value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from retrieval.cli.common import option_group


def ray_flags(ray_help: str) -> Callable[[Callable], Callable]:
    """``--ray``, ``--work-dir`` and ``--ship-code/--no-ship-code`` as one keyword ``ray``: a
    ``RayOptions``, or None without ``--ray``."""
    flags = [
        click.option("--ray", "ray_address", default=None, metavar="auto|local|ADDRESS", help=ray_help),
        click.option(
            "--work-dir",
            default=None,
            metavar="PATH|URL",
            help="With --ray: where the work units are written, a path every node sees or an fsspec URL "
            "(file:///..., s3://bucket/prefix with s3fs, gs:// with gcsfs). Default: the index's .work/ folder.",
        ),
        click.option(
            "--ship-code/--no-ship-code",
            default=True,
            show_default=True,
            help="With --ray ADDRESS or auto: send this retrieval package to the cluster's workers "
            "(runtime_env py_modules); --no-ship-code when they have it installed.",
        ),
    ]

    def make(ray_address: str | None, work_dir: str | None, ship_code: bool) -> Any:
        if ray_address is None:
            if work_dir is not None:
                raise click.UsageError("--work-dir is for Ray builds: add --ray local|auto|ADDRESS")
            return None
        from retrieval.embed.ray_cluster import RayOptions

        return RayOptions(address=ray_address, work_dir=work_dir, ship_code=ship_code)

    return option_group("ray", flags, make)

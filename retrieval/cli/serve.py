"""``retrieval serve``: serve one or more indexes over HTTP (clip-back compatible endpoints, /api/v1, the page)."""

from __future__ import annotations

import ipaddress
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from retrieval.cli.common import option_group, quiet_library_warnings, run_api

if TYPE_CHECKING:
    from retrieval.serve.config import ServeConfig

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def setup_serve_logging() -> None:
    """One line per request on stderr (``METHOD PATH STATUS MS``), and the server's warnings."""
    logger = logging.getLogger("retrieval.serve")
    if not any(getattr(h, "retrieval_serve", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.retrieval_serve = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _serve_config(
    indexes: Sequence[str],
    api_key: str | None,
    allow_image_urls: bool,
    allow_private_urls: bool,
    device: str,
    max_k: int,
    search_threads: int,
    ray_address: str | None,
) -> ServeConfig:
    """The ServeConfig of the command's options (a server that owns its process: its builds kept from the GC)."""
    from retrieval.serve.config import ServeConfig, parse_index_arg

    if allow_private_urls and not allow_image_urls:
        raise click.UsageError("--allow-private-urls needs --allow-image-urls")
    return ServeConfig(
        [parse_index_arg(value) for value in indexes],
        api_key=api_key,
        allow_image_urls=allow_image_urls,
        allow_private_urls=allow_private_urls,
        device=device,
        max_k=max_k,
        search_threads=search_threads,
        freeze_gc=True,
        ray=ray_address,
    )


serve_options = option_group(
    "config",
    [
        click.option(
            "--index",
            "indexes",
            multiple=True,
            required=True,
            metavar="[NAME=]DIR",
            help="An index directory to serve, optionally named (repeat for more; the first is the default).",
        ),
        click.option(
            "--api-key",
            default=None,
            envvar="RETRIEVAL_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every route but /healthz and the page "
            "(env RETRIEVAL_API_KEY).",
        ),
        click.option(
            "--allow-image-urls",
            is_flag=True,
            help="Let /knn-service fetch image_url (with a timeout and a size limit).",
        ),
        click.option(
            "--allow-private-urls",
            is_flag=True,
            help="With --allow-image-urls: also fetch loopback, private and link-local addresses.",
        ),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option(
            "--max-k",
            type=click.IntRange(min=1),
            default=1000,
            show_default=True,
            help="Largest k / num_images a request may ask for.",
        ),
        click.option(
            "--search-threads",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="OpenMP threads per FAISS search of a vector query (concurrent requests already use the cores).",
        ),
        click.option(
            "--ray",
            "ray_address",
            default=None,
            metavar="auto|local|ADDRESS",
            help="Search the shards of sharded indexes (build-index --index-shards) with one Ray actor each "
            "(pip install 'retrieval[ray]'); without it they are searched in this process.",
        ),
    ],
    _serve_config,
)
"""The served indexes and the server's guards: one ``config: ServeConfig``."""


@click.command("serve")
@serve_options
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind (a non-loopback one without --api-key warns).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=1234, show_default=True)
def serve_command(config: ServeConfig, host: str, port: int) -> None:
    """Serve indexes over HTTP until SIGINT or SIGTERM: /api/v1, clip back's /knn-service and /metadata, the page at /.

    A new build of a served index (build-index, add, remove) is picked up without a restart.
    """
    from retrieval.serve.app import create_app

    quiet_library_warnings()
    setup_serve_logging()
    if not is_loopback(host) and not config.api_key:
        click.echo(
            f"warning: serving on {host} without --api-key: anyone who can reach this address can query it", err=True
        )
    app = run_api(lambda: create_app(config))
    for name, build in app.state.served.builds().items():
        click.echo(f"serving index {name} (build {build})", err=True)
    click.echo(f"listening on http://{host}:{port} (stop with Ctrl-C)", err=True)
    stopped_by = run_until_signal(app, host, port)
    click.echo(f"stopped ({stopped_by})", err=True)


def run_until_signal(app: Any, host: str, port: int) -> str:
    """Run uvicorn until SIGINT or SIGTERM, shut down gracefully, and return the signal's name.

    uvicorn re-raises the signal it stopped for once it has shut down; the handlers set here take
    it, so the command ends normally (exit 0) instead of dying of it or printing a KeyboardInterrupt.
    """
    import signal

    import uvicorn

    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda number, frame: caught.append(number)) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return signal.Signals(caught[-1]).name if caught else "server exited"

"""Command line: parse options, call the Python API, print results (text, or JSON lines with --json)."""

from __future__ import annotations

import click

from retrieval.api.build import DEFAULT_INDEX
from retrieval.cli.build import build_anchors_command, build_index_command
from retrieval.cli.common import echo_json, in_flags, open_index_or_fail, quiet_library_warnings, run_api
from retrieval.cli.dedup import dedup_command
from retrieval.cli.evaluate import eval_command
from retrieval.cli.export import export_command
from retrieval.cli.query import (
    image_to_caption_command,
    image_to_image_command,
    text_to_caption_command,
    text_to_image_command,
)
from retrieval.cli.serve import serve_command
from retrieval.cli.update import add_command, remove_command
from retrieval.core.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="retrieval")
def main() -> None:
    """Vision-language search: index photos and captions, then ask text -> image and image -> caption.

    \b
    Contrastive model (one shared space):
      retrieval build-index --images photos/ --captions caps.txt --encoder open_clip:ViT-B-32/laion2b_s34b_b79k
    Frozen unimodal models bridged by ASIF anchors (works offline):
      retrieval build-index --images photos/ --captions caps.txt \\
          --image-encoder efficientnet-lite0 --text-encoder minilm --anchors builtin:imagenet
    Then:
      retrieval text-to-image "a dog running on the beach"
      retrieval image-to-caption photos/dog.jpg
      retrieval image-to-image photos/dog.jpg --exclude-self
      retrieval text-to-caption "a dog on a beach"
    """
    quiet_library_warnings()


main.add_command(build_anchors_command)
main.add_command(build_index_command)
main.add_command(text_to_image_command)
main.add_command(image_to_caption_command)
main.add_command(image_to_image_command)
main.add_command(text_to_caption_command)
main.add_command(add_command)
main.add_command(remove_command)
main.add_command(serve_command)
main.add_command(export_command)
main.add_command(dedup_command)
main.add_command(eval_command)


@main.command("info")
@click.option("--index", "index_path", default=str(DEFAULT_INDEX), show_default=True, help="Index directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def info_command(index_path: str, as_json: bool) -> None:
    """Summarise an index: encoders, counts, ASIF parameters, skipped items, size."""
    info = run_api(lambda: open_index_or_fail(index_path).info())
    if as_json:
        echo_json(info)
        return
    click.echo(
        f"index      {info['path']} (format {info['format']}, built {info['created']} by retrieval "
        f"{info['tool_version']})"
    )
    click.echo(f"mode       {info['mode']}")
    for role, record in info["encoders"].items():
        click.echo(f"{role:<10} {record['spec']} (dim {record['dim']}, weights {record['fingerprint']})")
    click.echo(
        f"items      {info['counts']['image']} images, {info['counts']['caption']} captions, {info['errors']} skipped"
    )
    deleted = info.get("deleted") or {}
    if any(deleted.values()):
        click.echo(
            f"deleted    {deleted.get('image', 0)} images, {deleted.get('caption', 0)} captions (hidden from results)"
        )
    requested = info["index"]
    budget = f", budget {requested['max_memory'] / 2**30:.2f} GB" if requested.get("max_memory") else ""
    click.echo(
        f"index type {requested.get('index_type', 'flat')} "
        f"(target recall@10 {requested.get('target_recall', 1.0)}{budget})"
    )
    for key, described in info.get("vector_indexes", {}).items():
        knobs = " ".join(f"{name}={value}" for name, value in described["knobs"].items()) or "exact"
        recall = described["recall@10"]
        measured = (
            (
                f"recall@1 {described['recall@1']:.3f} recall@10 {recall:.3f}, {described['latency_ms_median']:.3f} "
                "ms/query "
                f"({described['recall_queries']} queries: {described['query_source']})"
            )
            if recall is not None
            else "not measured (empty)"
        )
        click.echo(f"  {key:<18} {described['factory']} [{knobs}] {measured}")
        click.echo(f"  {'':<18} why: {described['why']}")
    if "anchors" in info:
        sets = ", ".join(f"{a['name']} ({a['count']} pairs, weight {a['weight']:g})" for a in info["anchors"])
        click.echo(f"anchors    {sets}; ASIF k={info['asif']['k']} p={info['asif']['p']:g}")
    click.echo(f"routes     {', '.join(info['routes'])}")
    queries = "; ".join(
        f"{query.replace('_', '-')} {'/'.join(routes)}" for query, routes in info["query_routes"].items()
    )
    click.echo(f"queries    {queries}")
    build = info["build"]
    speed = f", {build['images_per_second']} images/s" if build.get("images_per_second") else ""
    if build.get("workers"):
        speed += f" ({build['workers']} workers{' encoding too' if build.get('encoder_replicas') else ''})"
    click.echo(f"build      {build['seconds']:.1f} s on {build['device']}{speed}")
    click.echo(f"disk       {info['disk_bytes'] / 1e6:.2f} MB")


@main.command("list-encoders")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per encoder.")
def list_encoders_command(as_json: bool) -> None:
    """Show the encoder specs this tool knows and whether each works offline here."""
    from dataclasses import asdict, replace

    from retrieval.asif.anchors import list_builtin_anchor_sets
    from retrieval.encoders.registry import list_encoders

    encoders = [
        replace(info, description=in_flags(info.description), note=in_flags(info.note)) for info in list_encoders()
    ]
    if as_json:
        for info in encoders:
            echo_json(asdict(info))
        return
    width = max(len(info.name) for info in encoders)
    for info in encoders:
        status = "offline ok" if info.available_offline else "needs download"
        click.echo(
            f"{info.name:<{width}}  {info.kind:<10}  {status:<14}  {info.description}"
            + (f" ({info.note})" if info.note else "")
        )
    click.echo("built-in anchor sets: " + ", ".join(list_builtin_anchor_sets()))


if __name__ == "__main__":  # pragma: no cover
    main()

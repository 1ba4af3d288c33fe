"""`thoughtpatch pairs ...`: prepare, filter, stats, from-gsm8k, synth."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from thoughtpatch.cli import app

pairs_app = typer.Typer(help="Make, convert, filter and describe clean/corrupted pairs.", no_args_is_help=True)
app.add_typer(pairs_app, name="pairs")

_FORMAT_HELP = "auto, ours, seed-prepared (list of {pair_id, clean, corrupted}) or seed-source (flat rows)."


def _print_stats(stats: dict[str, Any]) -> None:
    from thoughtpatch.data.stats import format_stats

    for line in format_stats(stats):
        typer.echo(line)


@pairs_app.command("prepare")
def prepare_cmd(
    src: Path = typer.Argument(..., help="Pair file in any supported format."),
    out: Path = typer.Option(..., "--out", help="Where to write the pairs."),
    fmt: str = typer.Option("auto", "--format", help=_FORMAT_HELP),
    out_format: str = typer.Option("ours", "--out-format", help="ours, seed-prepared or seed-source."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as one JSON object."),
) -> None:
    """Convert a pair file to our format (keeps every pair) and print its statistics."""
    from thoughtpatch.data.formats import prepare
    from thoughtpatch.data.stats import pair_stats

    stats = pair_stats(prepare(src, out, fmt, out_format))
    if as_json:
        typer.echo(json.dumps(stats))
        return
    typer.echo(f"wrote {out}")
    _print_stats(stats)


@pairs_app.command("filter")
def filter_cmd(
    src: Path = typer.Argument(..., help="Pair file."),
    out: Path = typer.Option(..., "--out", help="Where to write the kept pairs."),
    fmt: str = typer.Option("auto", "--format", help=_FORMAT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print removals and statistics as one JSON object."),
) -> None:
    """Remove pairs with equal answers (and invalid ones), naming each with its reason."""
    from thoughtpatch.data.stats import filter_file, pair_stats

    kept, removed = filter_file(src, out, fmt)
    stats = pair_stats(kept)
    if as_json:
        typer.echo(json.dumps({"removed": [{"pair_id": i, "reason": r} for i, r in removed], "stats": stats}))
        return
    for pid, reason in removed:
        typer.echo(f"removed pair {pid}: {reason}")
    typer.echo(f"removed {len(removed)}, kept {len(kept)}; wrote {out}")
    _print_stats(stats)


@pairs_app.command("stats")
def stats_cmd(
    src: Path = typer.Argument(..., help="Pair file."),
    fmt: str = typer.Option("auto", "--format", help=_FORMAT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Count, answer difference, duplicates, question length, reasoning steps."""
    from thoughtpatch.data.formats import read_pairs
    from thoughtpatch.data.stats import pair_stats

    stats = pair_stats(read_pairs(src, fmt))
    if as_json:
        typer.echo(json.dumps(stats))
    else:
        _print_stats(stats)


@pairs_app.command("from-gsm8k")
def from_gsm8k_cmd(
    src: Path = typer.Argument(..., help="GSM8K jsonl: {\"question\", \"answer\": \"...<<a+b=c>>...#### N\"}."),
    out: Path = typer.Option(..., "--out", help="Where to write the pairs."),
    delta: str = typer.Option("1", "--delta", help="Added to the changed number (exact; may be negative)."),
    max_per_problem: int = typer.Option(1, "--max-per-problem", help="Pairs per problem at most (question order)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N problems."),
    rejections: Optional[Path] = typer.Option(None, "--rejections", help="Write every rejection as JSON lines."),
    as_json: bool = typer.Option(False, "--json", help="Print counts and statistics as one JSON object."),
) -> None:
    """Make pairs from GSM8K by changing one number and re-executing the annotations."""
    from thoughtpatch.data.gsm8k import gsm8k_to_file
    from thoughtpatch.data.stats import pair_stats

    t0 = time.perf_counter()
    result = gsm8k_to_file(src, out, delta, max_per_problem, limit, rejections)
    seconds = round(time.perf_counter() - t0, 2)
    summary = result.summary()
    stats = pair_stats(result.pairs)
    if as_json:
        typer.echo(json.dumps({**summary, "seconds": seconds, "stats": stats}))
        return
    typer.echo(
        f"{summary['problems_with_pairs']} of {summary['problems']} problems gave pairs "
        f"({100 * summary['yield']:.1f} %), {summary['pairs']} pairs in {seconds} s; wrote {out}"
    )
    typer.echo("problems without a pair, by reason:")
    for reason, n in summary["problem_rejections"].items():
        typer.echo(f"  {n:6d}  {reason}")
    typer.echo("rejected numbers, by reason:")
    for reason, n in summary["number_rejections"].items():
        typer.echo(f"  {n:6d}  {reason}")
    _print_stats(stats)

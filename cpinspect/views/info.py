"""The rich view of ``cpinspect info``: keys, segments, vision tokens and the input form.

``python -m cpinspect.views.info`` describes the built-in demo batch.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def render_info(summary: dict[str, Any], console: Console, *, source: str) -> None:
    files = summary["files"]
    for index, found in enumerate(files):
        title = f"keys in {source}" if len(files) == 1 else f"keys of rank {index}"
        table = Table(title=title, title_justify="left")
        table.add_column("key")
        table.add_column("shape")
        table.add_column("dtype")
        table.add_column("used as")
        used = {v: k for k, v in summary["fields"].items()}
        for entry in found:
            table.add_row(entry["key"], str(entry["shape"]), entry["dtype"], used.get(entry["key"], ""))
        console.print(table)
        if index == 0 and len(files) > 2:
            console.print(f"(ranks 1..{len(files) - 1} hold the same keys)")
            break
    lengths = summary["segment_lengths"]
    shown = lengths if len(lengths) <= 12 else [*lengths[:8], "...", *lengths[-3:]]
    console.print(f"segments: {summary['segments']} (physical lengths {shown})")
    if summary["logical_segment_lengths"] is not None:
        console.print(f"logical lengths: {summary['logical_segment_lengths'][:12]}"
                      f"{' ...' if summary['segments'] > 12 else ''}")
    console.print(f"row: {summary['row_tokens']:,} tokens per row; cu_seqlens ends at {summary['cu_seqlens_end']:,}"
                  + (f"; {summary['rank_files']} rank files" if summary["rank_files"] else ""))
    grids = [f"{summary[key]} {noun}(s)" if summary[key] is not None else f"no {key[:-1]}_grid_thw"
             for key, noun in (("images", "image"), ("videos", "video"))]
    console.print(f"vision tokens: {summary['image_tokens']:,} image_pad, {summary['video_tokens']:,} video_pad"
                  + (f"; grids: {', '.join(grids)}"
                     if summary["images"] is not None or summary["videos"] is not None else ""))
    if summary["vision_embed_count"] is not None:
        console.print(f"vision_embed_count: {summary['vision_embed_count']:,}")
    console.print(f"looks like: {summary['looks_like']}")
    console.print(f"input form: {summary['input_form']}", highlight=False)
    console.print(f"cpinspect: {summary['would_do']}", highlight=False)
    if any(k != v for k, v in summary["field_paths"].items()):
        console.print("fields from: " + "; ".join(f"{k} <- {v}" for k, v in summary["field_paths"].items()),
                      highlight=False)
    for note in summary["notes"]:
        console.print(f"{note['code']}: {note['message']}", highlight=False, markup=False)
    if "cp" in summary:
        console.print(f"for cp={summary['cp']}: {summary['form']}; every segment divisible by 2*cp: "
                      f"{'yes' if summary['divisible_by_2cp'] else 'no (use --pad)'}")


if __name__ == "__main__":
    from cpinspect.core import synth
    from cpinspect.core.loading import load_batch
    from cpinspect.core.summary import describe_batch
    from cpinspect.core.tokens import token_config

    render_info(describe_batch(load_batch(synth.demo_batch_dict()), token_config(), cp=2), Console(), source="demo")

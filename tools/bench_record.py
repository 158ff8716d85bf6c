"""What every benchmark tool shares: its JSON record (machine, date, command, parameters, raw
samples, the rows its tables show) and the markdown rendered from it.

A tool measures, writes the record, then renders the record; `--render RECORD.json` renders
again without measuring. A rendered markdown file keeps what was written by hand around its
generated part: only the text between the two GENERATED markers is replaced.

Record schema (SCHEMA):
  schema, tool      "powergrad-bench/1" and the tool's name (bench_pgt, bench_loader, ...)
  command           the command line that measured it
  date              YYYY-MM-DD of the measurement (null where unknown: see converted_from)
  machine           arch, cores, platform, node, python, torch, timm, torch_threads,
                    load_average ([at the start, at the end])
  params            the tool's settings
  samples           raw measurements, one value per round (null for a transcribed table)
  rows              {table: [row, ...]}: every number a table shows; a measured value with
                    its spread is {"median", "low", "high", "n"} (bench_timing.Spread)
  facts             other numbers the text shows
  converted_from    (only for records transcribed from an older markdown report) its file and
                    the commit that added it
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

SCHEMA = "powergrad-bench/1"
BEGIN = "<!-- GENERATED from {json} by `{render}`: edit the record or the tool, not this part -->"
END = "<!-- END GENERATED: notes written by hand go below -->"


def command_line(tool_path: str, argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", tool_path, *args])


def machine(threads: int | None = None) -> dict:
    import torch

    info = {"arch": platform.machine(), "cores": os.cpu_count(), "platform": platform.platform(),
            "node": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": threads,
            "load_average": [round(os.getloadavg()[0], 2)]}
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def new_record(tool: str, command: str, params: dict, threads: int | None = None) -> dict:
    return {"schema": SCHEMA, "tool": tool, "command": command,
            "date": time.strftime("%Y-%m-%d"), "machine": machine(threads), "params": params,
            "samples": {}, "rows": {}, "facts": {}}


def finish(record: dict) -> dict:
    """Notes the load average at the end of the measurement."""
    record["machine"]["load_average"].append(round(os.getloadavg()[0], 2))
    return record


def to_json_text(value, indent: str = "") -> str:
    """JSON with one key per line, but a list of numbers or a dict of plain values (a Spread)
    on one line, so a record reads like the table it renders to."""
    flat = isinstance(value, (list, dict)) and all(
        not isinstance(v, (list, dict)) for v in (value.values() if isinstance(value, dict)
                                                  else value))
    if not isinstance(value, (list, dict)) or flat or not value:
        return json.dumps(value)
    inner = indent + " "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {to_json_text(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    items = [inner + to_json_text(v, inner) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + indent + "]"


def write_json(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json_text(record) + "\n")


def read_json(path: Path, tool: str) -> dict:
    record = json.loads(Path(path).read_text())
    if record.get("schema") != SCHEMA or record.get("tool") != tool:
        raise SystemExit(f"{path}: not a {tool} record (schema {record.get('schema')!r}, "
                         f"tool {record.get('tool')!r}; expected {SCHEMA!r}, {tool!r})")
    return record


def splice(existing: str | None, generated: str, begin: str) -> str:
    """`generated` between the markers, and whatever `existing` holds outside them (notes
    written by hand); a file without markers is replaced whole."""
    block = f"{begin}\n{generated.rstrip()}\n{END}\n"
    if existing is None or END not in existing or "<!-- GENERATED" not in existing:
        return block
    head = existing[:existing.index("<!-- GENERATED")]
    tail = existing[existing.index(END) + len(END):].lstrip("\n")
    return head + block + ("\n" + tail if tail else "")


def write_markdown(path: Path, generated: str, json_path: Path, tool_path: str) -> None:
    begin = BEGIN.format(json=json_path.as_posix(), render=f"python {tool_path} --render "
                         f"{json_path.as_posix()} --write {path.as_posix()}")
    existing = path.read_text() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(splice(existing, generated, begin))


def provenance(record: dict) -> str:
    """A closing line for a record transcribed from an older report, else nothing."""
    origin = record.get("converted_from")
    if not origin:
        return ""
    return (f"\nNumbers transcribed from {origin['file']} as committed in {origin['commit']} "
            f"({origin['committed']}): the values its tables showed; its per-round samples were "
            "not kept.\n")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write", "--out", dest="write", type=Path, metavar="MD",
                        help="write the markdown here (its record goes beside it as .json "
                             "unless --json says where); default: print only")
    parser.add_argument("--json", type=Path, metavar="RECORD",
                        help="write the JSON record here")
    parser.add_argument("--render", type=Path, metavar="RECORD",
                        help="measure nothing: render this record (with --write, into MD)")


def run(args: argparse.Namespace, argv: list[str] | None, tool: str, tool_path: str,
        measure: Callable[[argparse.Namespace, str], dict],
        render: Callable[[dict], str]) -> dict:
    """The flow every tool shares: measure(args, command line) (or read --render's record),
    write the record, render it, print the markdown and write it where --write says."""
    if args.render is not None:
        record, json_path = read_json(args.render, tool), args.render
    else:
        record = finish(measure(args, command_line(tool_path, argv)))
        json_path = args.json or (args.write.with_suffix(".json") if args.write else None)
        if json_path is not None:
            write_json(record, json_path)
            print(f"wrote {json_path}")
    text = render(record) + provenance(record)
    print(text)
    if args.write is not None:
        write_markdown(args.write, text, json_path or args.write.with_suffix(".json"), tool_path)
        print(f"wrote {args.write}")
    return record

"""Summarise pytest-benchmark JSON as the README's codec table.

    pytest bench/bench_codec.py --benchmark-enable --benchmark-json=bench/results/codec.json
    python -m pigeon.bench.summarize bench/results/codec.json

Per benchmark: operations (or frames) per second for each implementation,
from the median, and the fastpath/python ratio, all from the same run.
"""

from __future__ import annotations

import re
import sys

import orjson


def rows(data: dict) -> list[tuple[str, dict[str, float]]]:
    table: dict[str, dict[str, float]] = {}
    for b in data["benchmarks"]:
        m = re.fullmatch(r"(\w+)\[(.*)\]", b["name"])
        if not m:
            continue
        params = m.group(2).split("-")
        impl = next((p for p in params if p in ("python", "fastpath")), None)
        if impl is None:
            continue
        rest = [p for p in params if p != impl]
        name = m.group(1) + (f"[{'-'.join(rest)}]" if rest else "")
        per_call = b["stats"]["median"]
        items = b.get("extra_info", {}).get("frames", 1)
        table.setdefault(name, {})[impl] = items / per_call
    return list(table.items())


def render(data: dict) -> str:
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", "?")
    lines = [
        f"Machine: {cpu}, {info.get('cpu', {}).get('count', '?')} cores, "
        f"Python {info.get('python_version', '?')}; {data.get('datetime', '')[:10]}",
        "",
        "| benchmark | python (ops/s) | fastpath (ops/s) | fastpath / python |",
        "|---|---:|---:|---:|",
    ]
    for name, r in rows(data):
        py, fast = r.get("python"), r.get("fastpath")
        ratio = f"{fast / py:.1f}x" if py and fast else "-"
        lines.append(f"| {name} | {py or 0:,.0f} | {fast or 0:,.0f} | {ratio} |")
    lines.append("")
    lines.append("ops are frames for write_frame_batch and parse_64k_buffer; medians of one run.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pigeon.bench.summarize RESULTS.json", file=sys.stderr)
        return 2
    try:
        with open(args[0], "rb") as f:
            data = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"pigeon.bench.summarize: cannot read {args[0]}: {exc}", file=sys.stderr)
        return 1
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

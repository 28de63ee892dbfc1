"""Summarise pytest-benchmark JSON as the README's codec table.

    pytest bench/bench_codec.py --benchmark-enable --benchmark-json=bench/results/codec.json
    python -m pigeon.bench.summarize bench/results/codec.json

Per benchmark: operations (or frames) per second for each implementation,
from the median, and the fastpath/python ratio, all from the same run.

With ``--baseline OLD.json`` (a saved earlier run, e.g. on main) each
implementation also gets "now / baseline": above 1 is faster.  A report
only: it never fails, since one run on a shared 2-core VM is noisy.
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


def render(data: dict, baseline: dict | None = None) -> str:
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", "?")
    lines = [
        f"Machine: {cpu}, {info.get('cpu', {}).get('count', '?')} cores, "
        f"Python {info.get('python_version', '?')}; {data.get('datetime', '')[:10]}",
        "",
        "| benchmark | python (ops/s) | fastpath (ops/s) | fastpath / python |"
        + (" python now / baseline | fastpath now / baseline |" if baseline else ""),
        "|---|---:|---:|---:|" + ("---:|---:|" if baseline else ""),
    ]
    old = dict(rows(baseline)) if baseline else {}
    for name, r in rows(data):
        py, fast = r.get("python"), r.get("fastpath")
        ratio = f"{fast / py:.1f}x" if py and fast else "-"
        line = f"| {name} | {py or 0:,.0f} | {fast or 0:,.0f} | {ratio} |"
        if baseline:
            for impl in ("python", "fastpath"):
                was, now = old.get(name, {}).get(impl), r.get(impl)
                line += f" {now / was:.2f} |" if was and now else " - |"
        lines.append(line)
    lines.append("")
    lines.append("ops are frames for write_frame_batch and parse_64k_buffer; medians of one run.")
    return "\n".join(lines)


def _load(path: str) -> dict:
    with open(path, "rb") as f:
        return orjson.loads(f.read())


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pigeon.bench.summarize")
    p.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--baseline", help="an earlier run's JSON to compare with (report only)")
    args = p.parse_args(argv)
    try:
        data = _load(args.results)
        baseline = _load(args.baseline) if args.baseline else None
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"pigeon.bench.summarize: cannot read the results: {exc}", file=sys.stderr)
        return 1
    print(render(data, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())

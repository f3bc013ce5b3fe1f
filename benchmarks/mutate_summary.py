"""The kill rate per module of the last `make mutate` run (mutmut 3's results under mutants/).

Prints a markdown table (the one in benchmarks/RESULTS-mutate.md): per mutated module, the mutants, how many
the tests killed, how many survived, how many no selected test covers ("no tests": a gap, reported apart),
timeouts, and the kill rate: killed / (mutants - no tests). A timeout is not counted as killed. With
``--min P``, exits 1 when a module's kill rate is below P percent, or when a mutant was never run.

Usage: ``.venv/bin/python benchmarks/mutate_summary.py [--min 85] [--root mutants]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

# mutmut's exit codes (mutmut/stats.py), as the table counts them
KILLED = {1, 3}  # a test failed; 3: pytest's internal error, which mutmut counts as killed too
SURVIVED = {0}
NO_TESTS = {5, 33}
TIMEOUT = {36, -24, 24, 152, 255}


def status(code: int | None) -> str:
    if code is None:
        return "not run"
    for name, codes in (("killed", KILLED), ("survived", SURVIVED), ("no tests", NO_TESTS), ("timeout", TIMEOUT)):
        if code in codes:
            return name
    return "other"


def summarize(root: Path) -> dict[str, Counter[str]]:
    """Per module (its path under ``root``, without ``.meta``): the count of each status."""
    table: dict[str, Counter[str]] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        table[str(meta.relative_to(root))[: -len(".meta")]] = Counter(status(c) for c in codes.values())
    return table


def rate(counts: Counter[str]) -> float:
    tested = sum(counts.values()) - counts["no tests"]
    return 100.0 * counts["killed"] / tested if tested else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("mutants"))
    parser.add_argument("--min", type=float, default=None, help="fail below this kill rate, in percent")
    args = parser.parse_args(argv)
    table = summarize(args.root)
    if not table:
        print(f"no mutmut results under {args.root}/: run `make mutate` first", file=sys.stderr)
        return 1
    print("| module | mutants | killed | survived | no tests | timeout | other | not run | kill rate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    failing = []
    for module, c in table.items():
        print(
            f"| `{module}` | {sum(c.values())} | {c['killed']} | {c['survived']} | {c['no tests']} | {c['timeout']} "
            f"| {c['other']} | {c['not run']} | {rate(c):.1f}% |"
        )
        if args.min is not None and (rate(c) < args.min or c["not run"]):
            failing.append(module)
    if failing:
        print(f"below {args.min:g}% killed, or not run: {', '.join(failing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

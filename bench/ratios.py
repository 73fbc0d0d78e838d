#!/usr/bin/env python3
"""Ratios of accept rates against a baseline server, from smtp_accept.sh results.

    python3 bench/ratios.py RESULTS_TSV [--baseline aiosmtpd] [--check]

For each scenario and each server other than the baseline: the median
msgs/s of its successful runs (rc 0) divided by the baseline's median in the
same file. Servers whose name starts with ``SmtpEdge`` are held to the
targets below; ``--check`` makes the exit status 1 when a target is missed
or cannot be computed. Prints a markdown table. Stdlib only.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys

# scenario -> the least SmtpEdge / baseline ratio that meets the target
TARGETS = {
    "s20_1k_keep": 2.5,
    "s20_100k_keep": 8.0,
}
TITLES = {
    "s20_1k_keep": "1 KB, 20 sessions, kept alive",
    "s20_1k_conn": "1 KB, 20 sessions, 1 msg/conn",
    "s20_100k_keep": "100 KB, 20 sessions, kept alive",
    "s1_1k_keep": "1 KB, 1 session, kept alive",
}
SUBJECT_PREFIX = "SmtpEdge"


Key = tuple[str, str]  # (server, scenario)


def read_rates(path: str) -> tuple[dict[Key, list[float]], dict[Key, int], list[str], list[str]]:
    """Rates and run counts from a results TSV.

    Returns {(server, scenario): [msgs/s of each successful run]} (an empty
    list when every run failed), {(server, scenario): number of runs}, and
    the servers and scenarios in the order they first appear.
    """
    rates: dict[Key, list[float]] = {}
    counts: dict[Key, int] = {}
    servers: list[str] = []
    scenarios: list[str] = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            server, scenario = row["server"], row["scenario"]
            if scenario == "swaks_check":
                continue
            if server not in servers:
                servers.append(server)
            if scenario not in scenarios:
                scenarios.append(scenario)
            runs = rates.setdefault((server, scenario), [])
            counts[server, scenario] = counts.get((server, scenario), 0) + 1
            if row["rc"] == "0" and row["msgs_per_s"] not in ("", "NA", "-"):
                runs.append(float(row["msgs_per_s"]))
    return rates, counts, servers, scenarios


def ratio_table(path: str, baseline: str) -> tuple[list[str], bool]:
    """Markdown lines, and whether every target was met."""
    rates, counts, servers, scenarios = read_rates(path)
    lines = [
        f"Ratio of median msgs/s to {baseline} (same run; runs that failed are left out):",
        "",
        f"| scenario | server | median msgs/s | {baseline} median | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    all_met = True
    subjects = [s for s in servers if s != baseline]
    if baseline not in servers:
        lines.append(f"| - | - | - | no {baseline} rows | - | - | no |")
        return lines, False
    if not any(s.startswith(SUBJECT_PREFIX) for s in subjects):
        all_met = False
        lines.append(f"| - | no {SUBJECT_PREFIX}* rows | - | - | - | - | no |")
    for scenario in scenarios:
        base_runs = rates.get((baseline, scenario), [])
        base = statistics.median(base_runs) if base_runs else None
        target = TARGETS.get(scenario)
        for server in subjects:
            runs = rates.get((server, scenario))
            if runs is None:
                continue
            med = statistics.median(runs) if runs else None
            ratio = med / base if (med is not None and base) else None
            held = target is not None and server.startswith(SUBJECT_PREFIX)
            if not held:
                verdict = "-"
            elif ratio is None:
                verdict = "no data"
                all_met = False
            elif ratio >= target:
                verdict = "yes"
            else:
                verdict = "NO"
                all_met = False
            lines.append(
                "| {} | {} | {} | {} | {} | {} | {} |".format(
                    TITLES.get(scenario, scenario),
                    server,
                    _rate(med, runs, counts[server, scenario]),
                    _rate(base, base_runs, counts.get((baseline, scenario), 0)),
                    f"{ratio:.2f}x" if ratio is not None else "n/a",
                    f">= {target:g}x" if held else "-",
                    verdict,
                )
            )
    return lines, all_met


def _rate(median: float | None, runs: list[float], total: int) -> str:
    """'3,512 (3 runs)', or with failed runs '3,512 (2 of 3 runs ok)'."""
    if median is None:
        return f"FAIL ({total} runs)" if total else "no runs"
    if len(runs) == total:
        return f"{median:,.0f} ({total} runs)"
    return f"{median:,.0f} ({len(runs)} of {total} runs ok)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results_tsv")
    ap.add_argument("--baseline", default="aiosmtpd")
    ap.add_argument(
        "--check", action="store_true", help="exit 1 unless every SmtpEdge target is met"
    )
    args = ap.parse_args(argv)
    lines, all_met = ratio_table(args.results_tsv, args.baseline)
    print("\n".join(lines))
    if args.check and not all_met:
        print("\nratios: at least one target was missed or could not be computed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

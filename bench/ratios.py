#!/usr/bin/env python3
"""Ratios of accept rates against a baseline server, from smtp_accept.sh results.

    python3 bench/ratios.py RESULTS_TSV [--baseline NAME ...] [--check]

For each baseline, each scenario and each other server: the median msgs/s of
its successful runs (rc 0) divided by the baseline's median in the same
file. The targets depend on the pair (subject, baseline), see ``COMPARISONS``:

- ``SmtpEdge*`` rows (the edge alone, messages dropped) against ``aiosmtpd``
  (not the ``+sqlite``/``+postgres`` rows, which store every message);
- ``SmtpEdge+sqlite*`` rows (the edge storing every message durably in
  SqliteStorage) against ``postfix-hold`` (Postfix queueing on hold).

Without ``--baseline``, one table for each baseline of ``COMPARISONS`` that
has rows in the file (if none has: for each whose subjects have rows, so the
table says what is missing; else ``aiosmtpd``). Other rows are listed
without a target. ``--check`` makes the exit status 1 when a target is
missed or cannot be computed. Prints markdown. Stdlib only.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Comparison:
    """Which rows are held to which targets against one baseline."""

    baseline: str
    subject: str  # a regular expression that a held row's whole name matches
    label: str  # how the subjects are named in messages
    targets: dict[str, float]  # scenario -> least subject / baseline ratio


COMPARISONS = (
    # The edge alone (bench/slimta_sink.py) against aiosmtpd.
    Comparison("aiosmtpd", r"SmtpEdge(?!\+(?:sqlite|postgres)).*", "SmtpEdge*",
               {"s20_1k_keep": 2.5, "s20_100k_keep": 8.0}),
    # Edge + Queue + SqliteStorage, fsync on (bench/queue_sink.py), against
    # Postfix with its queue on hold (one fsync per message).
    Comparison("postfix-hold", r"SmtpEdge\+sqlite.*", "SmtpEdge+sqlite*",
               {"s20_1k_keep": 2.0, "s20_100k_keep": 1.5}),
)
TITLES = {
    "s20_1k_keep": "1 KB, 20 sessions, kept alive",
    "s20_1k_conn": "1 KB, 20 sessions, 1 msg/conn",
    "s20_100k_keep": "100 KB, 20 sessions, kept alive",
    "s1_1k_keep": "1 KB, 1 session, kept alive",
}


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


def comparison_for(baseline: str) -> Comparison | None:
    for comp in COMPARISONS:
        if comp.baseline == baseline:
            return comp
    return None


def ratio_table(path: str, baseline: str) -> tuple[list[str], bool]:
    """Markdown lines, and whether every target of this baseline was met."""
    rates, counts, servers, scenarios = read_rates(path)
    comp = comparison_for(baseline)
    targets = comp.targets if comp else {}

    def held(server: str) -> bool:
        return comp is not None and re.fullmatch(comp.subject, server) is not None

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
    if comp is not None and not any(held(s) for s in subjects):
        all_met = False
        lines.append(f"| - | no {comp.label} rows | - | - | - | - | no |")
    for scenario in scenarios:
        base_runs = rates.get((baseline, scenario), [])
        base = statistics.median(base_runs) if base_runs else None
        target = targets.get(scenario)
        for server in subjects:
            runs = rates.get((server, scenario))
            if runs is None:
                continue
            med = statistics.median(runs) if runs else None
            ratio = med / base if (med is not None and base) else None
            is_held = target is not None and held(server)
            if not is_held:
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
                    f">= {target:g}x" if is_held else "-",
                    verdict,
                )
            )
    return lines, all_met


def default_baselines(path: str) -> list[str]:
    """The baselines of COMPARISONS that have rows in the file.

    When none has, those whose subjects have rows (so the table says the
    baseline is missing), else the first one.
    """
    _, _, servers, _ = read_rates(path)
    found = [c.baseline for c in COMPARISONS if c.baseline in servers]
    if not found:
        found = [c.baseline for c in COMPARISONS
                 if any(re.fullmatch(c.subject, s) for s in servers)]
    return found or [COMPARISONS[0].baseline]


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
    ap.add_argument(
        "--baseline", action="append", default=None,
        help="the row to divide by (repeatable); default: every known baseline in the file "
        f"({', '.join(c.baseline for c in COMPARISONS)})",
    )
    ap.add_argument(
        "--check", action="store_true", help="exit 1 unless every target shown is met"
    )
    args = ap.parse_args(argv)
    baselines = args.baseline or default_baselines(args.results_tsv)
    all_met = True
    out: list[str] = []
    for baseline in baselines:
        lines, met = ratio_table(args.results_tsv, baseline)
        all_met = all_met and met
        if out:
            out.append("")
        out.extend(lines)
    print("\n".join(out))
    if args.check and not all_met:
        print("\nratios: at least one target was missed or could not be computed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Compares two JUnit XML reports of llama.cpp's server test suite: one run against stock
llama-server, one through `spark serve`. The rule: no test that passes against stock fails (or
errors, or goes missing) through spark. Prints the counts of both sides and every regression;
exit 0 when there is none, 1 when there is one, 2 when a report cannot be read.

    compare.py STOCK.xml SPARK.xml [--json OUT.json]
"""

import json
import sys
import xml.etree.ElementTree as ET


def outcomes(path):
    """{test id: passed | failed | error | skipped} of one JUnit XML report."""
    root = ET.parse(path).getroot()
    out = {}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        tags = {child.tag for child in case}
        if "error" in tags:
            outcome = "error"
        elif "failure" in tags:
            outcome = "failed"
        elif "skipped" in tags:
            outcome = "skipped"
        else:
            outcome = "passed"
        # A test id reported twice (a teardown error after a pass) keeps its worst outcome.
        rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
        if test_id not in out or rank[outcome] > rank[out[test_id]]:
            out[test_id] = outcome
    return out


def counts(o):
    c = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for v in o.values():
        c[v] += 1
    return c


def compare(stock, spark):
    """Tests that pass against stock and do not pass through spark, with what spark did."""
    return sorted(
        (t, spark.get(t, "missing"))
        for t, v in stock.items()
        if v == "passed" and spark.get(t) != "passed"
    )


def main(argv):
    args = argv[1:]
    json_out = None
    if "--json" in args:
        i = args.index("--json")
        if i + 1 >= len(args):
            print("compare: --json needs a path", file=sys.stderr)
            return 2
        json_out = args[i + 1]
        del args[i : i + 2]
    if len(args) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        stock, spark = outcomes(args[0]), outcomes(args[1])
    except (OSError, ET.ParseError) as e:
        print(f"compare: read the reports: {e}", file=sys.stderr)
        return 2
    regressions = compare(stock, spark)
    gained = sorted(t for t, v in spark.items() if v == "passed" and stock.get(t) != "passed")
    cs, cp = counts(stock), counts(spark)
    fmt = lambda c: f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped"
    print(f"against stock llama-server: {fmt(cs)}")
    print(f"through spark serve:        {fmt(cp)}")
    for t, what in regressions:
        print(f"REGRESSION: {t} passes against stock, {what} through spark")
    for t in gained:
        print(f"note: {t} passes through spark only")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(
                {
                    "stock": cs,
                    "spark": cp,
                    "regressions": [{"test": t, "spark": w} for t, w in regressions],
                    "spark_only_passes": gained,
                },
                f,
                indent=2,
            )
    if regressions:
        print(f"{len(regressions)} test(s) pass against stock llama-server and fail through spark")
        return 1
    print("no test that passes against stock llama-server fails through spark")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

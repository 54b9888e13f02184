"""Per-family counts from the reference suite's JUnit XML: passed / failed / not applicable (not_applicable.txt)
/ skipped upstream (by upstream's own markers, such as GPU, flash-attn, deepspeed or slow, or by the mixins' own
checks of the model's capabilities), and the pass rate over the applicable tests (passed + failed). Exit status 1
when a family's rate is below --min-rate, when a family ran no applicable test, or when anything outside the three
families failed (a collection error, say)."""

from __future__ import annotations

import argparse
import collections
import sys
import xml.etree.ElementTree as ET

FAMILIES = ("Glm", "XGLM", "Persimmon")


def family_of(classname: str) -> str:
    test_class = classname.rsplit(".", 1)[-1]
    return next((f for f in FAMILIES if test_class.startswith(f)), "other")


def count(xml_path: str) -> dict[str, collections.Counter]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        family = family_of(case.get("classname", ""))
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            counts[family]["failed"] += 1
        elif skipped is not None:
            reason = skipped.get("message") or ""
            counts[family]["not applicable" if "not applicable:" in reason else "skipped upstream"] += 1
        else:
            counts[family]["passed"] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("xml")
    parser.add_argument("--min-rate", type=float, default=0.0)
    args = parser.parse_args()
    counts = count(args.xml)
    low = False
    for family in FAMILIES + (("other",) if counts["other"] else ()):
        c = counts[family]
        applicable = c["passed"] + c["failed"]
        rate = c["passed"] / applicable if applicable else 0.0
        low |= c["failed"] > 0 if family == "other" else applicable == 0 or rate < args.min_rate
        print(f"{family:10s} passed {c['passed']:4d}  failed {c['failed']:4d}  not applicable {c['not applicable']:4d}"
              f"  skipped upstream {c['skipped upstream']:4d}  pass rate {rate:.1%}")  # fmt: skip
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-test comparison of the stock and swapped runs (pytest JUnit XML) into ``trl_suite.{json,md}``."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from differences import BOTH, DIFFERENCES

CATEGORY_TITLES = {
    "intended": "asserts TRL behaviour the swap changes on purpose",
    "adapter": "the adapter is wrong or lacks the feature (to fix)",
    "harness": "the harness (tiny local models), not the product",
    "unexplained": "no root cause recorded yet",
}


def outcomes(junit_xml: Path) -> dict[str, dict[str, object]]:
    """``{Class::test[params]: {"outcome", "message", "seconds"}}`` from a pytest JUnit report."""
    out: dict[str, dict[str, object]] = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = ("failed" if child.tag == "failure" else "error"), child.get("message", "")
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                outcome, message = ("xfailed" if xfail else "skipped"), child.get("message", "")
        out[test_id] = {"outcome": outcome, "message": message.strip().splitlines()[0][:300] if message else ""}
        out[test_id]["seconds"] = round(float(case.get("time", 0.0)), 2)
    return out


def _good(outcome: str) -> bool:
    return outcome in ("passed", "xfailed", "skipped")


def compare(stock: dict, swap: dict) -> list[dict[str, object]]:
    """One row per test: both outcomes, and for every difference its category and root cause."""
    rows = []
    for test_id in list(stock) + [t for t in swap if t not in stock]:
        a, b = stock.get(test_id, {"outcome": "absent"}), swap.get(test_id, {"outcome": "absent"})
        row: dict[str, object] = {"test": test_id, "stock": a["outcome"], "swap": b["outcome"]}
        if a["outcome"] != b["outcome"]:
            category, reason = DIFFERENCES.get(test_id, ("unexplained", b.get("message", "")))
            row.update(category=category, reason=reason)
        elif not _good(a["outcome"]):
            row.update(category="both", reason=BOTH.get(test_id, a.get("message", "")))
        elif a["outcome"] == "skipped":
            row.update(reason=a.get("message", ""))
        row["stock_message"], row["swap_message"] = a.get("message", ""), b.get("message", "")
        row["stock_s"], row["swap_s"] = a.get("seconds", 0.0), b.get("seconds", 0.0)
        rows.append(row)
    return rows


def summary(rows: list[dict[str, object]]) -> dict[str, int]:
    pairs = Counter(f"{r['stock']} -> {r['swap']}" for r in rows)
    return {"items": len(rows), **dict(sorted(pairs.items()))}


def markdown(rows: list[dict[str, object]], meta: dict[str, object]) -> str:
    counts = summary(rows)
    lines = [
        "# TRL's own GRPO trainer tests: stock TRL vs the grpo-fix swap",
        "",
        f"Measured on: {meta['machine']}",
        "",
        f"TRL test file: `{meta['trl_source']['repository']}` `tests/test_grpo_trainer.py` at "
        f"{meta['trl_source']['commit'][:9]} ({meta['trl_source']['commit_date'][:10]}, "
        f"VERSION {meta['trl_source']['version_file']}); installed: {meta['versions']}.",
        f"grpo-fix: {meta['grpo_fix']}. Command: `{meta['command']}`.",
        *(_selection_note(counts["items"]) if " -k " in f" {meta['command']} " else []),
        "",
        "| stock -> swap | items |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in counts.items() if k != "items"],
        f"| **total** | {counts['items']} |",
        "",
        "## Tests whose outcome differs",
        "",
        "| test | stock | swap | category | root cause |",
        "|---|---|---|---|---|",
    ]
    differ = [r for r in rows if r["stock"] != r["swap"]]
    lines += [f"| `{r['test']}` | {r['stock']} | {r['swap']} | {r['category']} | {r['reason']} |" for r in differ]
    lines += ["", "Categories: " + "; ".join(f"**{k}**: {v}" for k, v in CATEGORY_TITLES.items()) + ".", ""]
    lines += ["## Tests that fail in both runs", "", "| test | outcome | cause |", "|---|---|---|"]
    lines += [f"| `{r['test']}` | {r['stock']} | {r['reason']} |" for r in rows if r.get("category") == "both"]
    lines += ["", "## Skipped in both runs", "", "| reason | items |", "|---|---|"]
    skipped = Counter(str(r.get("reason")) for r in rows if r["stock"] == r["swap"] == "skipped")
    lines += [f"| {reason} | {n} |" for reason, n in skipped.most_common()]
    lines += ["", "## Every item", "", "| test | stock | swap | stock s | swap s |", "|---|---|---|---|---|"]
    lines += [f"| `{r['test']}` | {r['stock']} | {r['swap']} | {r['stock_s']} | {r['swap_s']} |" for r in rows]
    return "\n".join(lines) + "\n"


def _selection_note(items: int) -> list[str]:
    return ["", f"**A selection** (`-k`): {items} of the file's items, compared with the same items of the other run."]


def write(rows: list[dict[str, object]], meta: dict[str, object], out: Path) -> dict[str, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": out.with_suffix(".json"), "md": out.with_suffix(".md")}
    paths["json"].write_text(json.dumps({**meta, "summary": summary(rows), "tests": rows}, indent=1))
    paths["md"].write_text(markdown(rows, meta))
    return paths

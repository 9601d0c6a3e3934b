"""The GPU session's results as the Markdown that docs/guide/gpus.md takes.

    python bench/gpu_report.py OUT        # OUT: bench/gpu_session.sh's folder

Reads OUT/gpu_throughput.json and OUT/decode_agreement.json (either may be
missing: a session cut short) and prints the machine, a table of every loop's
images/s (end to end and steady, GPU utilisation), issue 29's targets, and how
far the batch decoder lands from the CPU path. bench/gpu_session.sh writes it
to OUT/report.md, so the figures come back ready to paste.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from decode_agreement import summary  # beside this file
from gpu_throughput import TARGETS


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _util(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} %"


def throughput(r: dict) -> list[str]:
    lines = [
        f"{r['device']}, {r['cores']} cores, torch {r['torch']}, {r['precision']}; "
        f"{r['images']:,} JPEGs of {r['sides'][0]}-{r['sides'][1]} px.",
        "",
        "| what | batch | end to end | steady | GPU |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    if "decode_only" in r:
        lines.append(
            f"| decoding alone (DataLoader, {r['cores']} processes) | | | "
            f"{_rate(r['decode_only'])} | |"
        )
    for batch, rate in (r.get("model_only") or {}).items():
        lines.append(f"| the model alone | {batch} | | {_rate(rate)} | |")
    for name, key in (("DataLoader loop", "reference"), ("nvJPEG loop", "nvjpeg")):
        for x in r.get(key, []):
            what = name if key == "reference" else f"{x['decoder']} loop"
            lines.append(
                f"| {what} | {x['batch']} | {_rate(x['end_to_end'])} | "
                f"{_rate(x['steady'])} | {_util(x['gpu_util'])} |"
            )
    for x in r.get("imgindex", []):
        folder = "mixed folder" if x["folder"].startswith("mixed") else "JPEGs"
        rates = f"{_rate(x['end_to_end'])} | {_rate(x['steady'])}"
        lines.append(
            f"| imgindex, {x['decoder']} decoder, {folder} | {x['batch'] or 'default'} "
            f"| {rates} | {_util(x['gpu_util'])} |"
        )
    lines.append("")
    for what, ratio in (r.get("targets") or {}).items():
        bar = TARGETS.get(what)
        verdict = "" if bar is None else (" met" if ratio >= bar else " **not met**")
        lines.append(f"- {what}: {ratio:.2f}{verdict}")
    return lines


def agreement(a: dict) -> list[str]:
    return ["", f"Batch decoder ({a['backend']}) against the CPU path: {summary(a)}."]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    lines: list[str] = []
    r = _load(out / "gpu_throughput.json")
    lines += throughput(r) if r else ["(no gpu_throughput.json)"]
    a = _load(out / "decode_agreement.json")
    lines += agreement(a) if a else ["", "(no decode_agreement.json)"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The README tables of runs/demos.sh (issue 20) from what it wrote in OUT: hexagon LoRA and MPO before and after,
best-of-N and step F1 of the process reward model, each with the minutes its steps took.
    python runs/demo_tables.py OUT        (prints markdown; demos.sh writes it to OUT/tables.md)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from internvl.eval.tasks import markdown, pct
from internvl.prm.bench import bench_table
from internvl.prm.select import bon_table

STEPS = {  # what each demo's steps are called in the time line (names as in OUT/times.tsv)
    "lora": {"data_hexagon": "hexagon data", "data_hex_test": "hexagon test data", "lora": "LoRA training",
             "eval_base_hex": "hexagon eval before", "eval_lora_hex": "hexagon eval after",
             "eval_base": "test eval before", "eval_lora": "test eval after"},
    "mpo": {"data_mpo": "questions", "prefs": "build-prefs", "mpo": "MPO training", "eval_base": "test eval before",
            "eval_mpo": "test eval after"},
    "prm": {"data_prm": "train items", "prm_data": "step labels", "prm": "PRM training", "orm_data": "outcome labels",
            "orm": "ORM training", "bon": "best-of-N", "prm_test": "test step labels", "prm_bench": "prm-bench"},
}  # fmt: skip
SIZES = {"lora": ("HEX_N", "HEX_EVAL_N", "LORA_R", "LORA_STEPS", "EVAL_N"), "mpo": ("MPO_N", "MPO_SAMPLES",
         "MPO_STEPS", "EVAL_N"), "prm": ("PRM_N", "PRM_STEPS", "ORM_STEPS", "BON_N", "BON_K", "BENCH_N")}  # fmt: skip


def _tsv(path: Path) -> dict[str, str]:
    """name -> value of a two-column TSV; a later line wins (a step run again)."""
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {name: value for name, value in rows}


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _change(before: float | None, after: float | None) -> str:
    return "-" if before is None or after is None else f"{100 * (after - before):+.1f}"


def compare(before: dict, after: dict, hex_before: dict | None = None, hex_after: dict | None = None) -> str:
    """Accuracy (%) per task before and after, the mean, and first the hexagon split's two groups when given."""
    rows = []
    groups = (("hexagon", "items about the hexagon (hexagon split)"), ("other", "other items of the hexagon split"))
    for group, label in groups:
        if hex_before and hex_after and group in hex_before:
            b, a = hex_before[group], hex_after.get(group, {})
            rows.append([label, b["n"], pct(b["accuracy"]), pct(a.get("accuracy")),
                         _change(b["accuracy"], a.get("accuracy"))])  # fmt: skip
    for task, t in before["tasks"].items():
        a = after["tasks"].get(task, {}).get("accuracy")
        rows.append([task, t["n"], pct(t["accuracy"]), pct(a), _change(t["accuracy"], a)])
    rows.append(["**mean**", before["n"], pct(before["overall"]), pct(after["overall"]),
                 _change(before["overall"], after["overall"])])  # fmt: skip
    return markdown(["task", "n", "before (%)", "after (%)", "change (points)"], rows)


def footer(demo: str, times: dict[str, str], sizes: dict[str, str]) -> str:
    took = [f"{label} {int(times[s]) / 60:.1f} min" for s, label in STEPS[demo].items() if s in times]
    total = sum(int(times[s]) for s in STEPS[demo] if s in times) / 60
    used = ", ".join(f"{k}={sizes[k]}" for k in SIZES[demo] if k in sizes)
    return f"Time on this machine: {', '.join(took)} ({total:.0f} min in all). Sizes: {used}."


def tables(out: Path) -> str:
    out = Path(out)
    times, sizes = _tsv(out / "times.tsv"), _tsv(out / "sizes.tsv")
    ev = {name: _json(out / "eval" / name / "summary.json") for name in ("base", "base_hex", "lora", "lora_hex", "mpo")}
    parts = []
    if ev["base"] and ev["lora"] and ev["base_hex"] and ev["lora_hex"]:
        parts += ["### Hexagon LoRA (`internvl finetune --lora-r`)", compare(ev["base"], ev["lora"], ev["base_hex"],
                  ev["lora_hex"]), footer("lora", times, sizes)]  # fmt: skip
    if ev["base"] and ev["mpo"]:
        prefs = _json(out / "prefs" / "summary.json") or {}
        pairs = ", ".join(f"{n} {kind}" for kind, n in prefs.get("pairs", {}).items())
        parts += ["### MPO on the model's own reasoning answers", compare(ev["base"], ev["mpo"]),
                  (f"Pairs: {prefs.get('total_pairs')} ({pairs}) from {prefs.get('sampled')} answers to "
                   f"{prefs.get('questions')} questions, {pct(prefs.get('correct_rate'))}% correct."),
                  footer("mpo", times, sizes)]  # fmt: skip
    bon, bench = _json(out / "bon.json"), _json(out / "prm_bench.json")
    if bon and bench:
        orm = "a trained outcome-only RM" if int(sizes.get("ORM_STEPS", "0")) > 0 else "the PRM reading one step"
        parts += ["### Best-of-N with the process reward model (accuracy %)", bon_table(bon),
                  f"ORM: {orm}; PRM score: the {bon['aggregate']} of its step scores.",
                  "### Step correctness (VisualProcessBench's form, %)", bench_table(bench),
                  footer("prm", times, sizes)]  # fmt: skip
    return "\n\n".join(parts) + "\n" if parts else "nothing measured yet\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python runs/demo_tables.py OUT")
    print(tables(Path(sys.argv[1])), end="")

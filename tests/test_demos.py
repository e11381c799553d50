"""runs/demos.sh (issue 20's measurements): its table builder turns the steps' outputs into the README's markdown,
and (slow) the script runs every step end to end on the built-in model with tiny sizes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo_tables", ROOT / "runs" / "demo_tables.py")
demo_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_tables)


def _summary(accs: dict[str, float], n: int = 4, **groups) -> dict:
    return {"overall": sum(accs.values()) / len(accs), "n": n * len(accs),
            "tasks": {t: {"n": n, "accuracy": a} for t, a in accs.items()}, **groups}  # fmt: skip


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


@pytest.fixture
def outputs(tmp_path):
    ev = tmp_path / "eval"
    _write(ev / "base" / "summary.json", _summary({"count": 0.25, "reasoning": 0.5}))
    _write(ev / "lora" / "summary.json", _summary({"count": 0.5, "reasoning": 0.5}))
    _write(ev / "mpo" / "summary.json", _summary({"count": 0.25, "reasoning": 0.75}))
    _write(ev / "base_hex" / "summary.json", _summary({"shape": 0.1}, n=10, hexagon={"n": 6, "accuracy": 0.0},
                                                      other={"n": 4, "accuracy": 0.25}))  # fmt: skip
    _write(ev / "lora_hex" / "summary.json", _summary({"shape": 0.9}, n=10, hexagon={"n": 6, "accuracy": 1.0},
                                                      other={"n": 4, "accuracy": 0.75}))  # fmt: skip
    prefs = {"questions": 3, "sampled": 24, "correct_rate": 0.25, "pairs": {"correctness": 5, "truncation": 2},
             "total_pairs": 7}  # fmt: skip
    _write(tmp_path / "prefs" / "summary.json", prefs)
    accuracy = {"greedy": 0.5, "sample": 0.4, "majority": 0.5, "orm": 0.5, "prm": 1.0, "pass": 1.0}
    _write(tmp_path / "bon.json", {"n": 8, "aggregate": "mean", "tasks": {"reasoning": {"items": 2,
                                   "accuracy": accuracy}}, "items": []})  # fmt: skip
    metric = {"solutions": 4, "steps": 10, "macro_f1": 0.75, "wrong": {"f1": 0.5}, "correct": {"f1": 1.0},
              "accuracy": 0.9, "first_error": 0.5}  # fmt: skip
    _write(tmp_path / "prm_bench.json", {**metric, "kinds": {}})
    # eval_base ran twice (a rerun after its output was removed): the later time counts
    _write(tmp_path / "times.tsv", "eval_base\t1\nlora\t600\neval_base\t120\neval_lora\t60\nmpo\t300\nbon\t90\n"
                                   "prm\t30\nprm_bench\t30\n")  # fmt: skip
    _write(tmp_path / "sizes.tsv", "HEX_N\t2\nLORA_STEPS\t5\nORM_STEPS\t0\nMPO_STEPS\t3\n")
    return tmp_path


def test_the_tables_say_what_the_outputs_hold(outputs):
    md = demo_tables.tables(outputs)
    lora = md.split("### Hexagon LoRA (`internvl finetune --lora-r`)\n\n")[1].split("\n\n### ")[0]
    assert lora == (
        "| task | n | before (%) | after (%) | change (points) |\n"
        "|---|---:|---:|---:|---:|\n"
        "| items about the hexagon (hexagon split) | 6 | 0.0 | 100.0 | +100.0 |\n"
        "| other items of the hexagon split | 4 | 25.0 | 75.0 | +50.0 |\n"
        "| count | 4 | 25.0 | 50.0 | +25.0 |\n"
        "| reasoning | 4 | 50.0 | 50.0 | +0.0 |\n"
        "| **mean** | 8 | 37.5 | 50.0 | +12.5 |\n\n"
        "Time on this machine: LoRA training 10.0 min, test eval before 2.0 min, test eval after 1.0 min "
        "(13 min in all). Sizes: HEX_N=2, LORA_STEPS=5."
    )  # fmt: skip
    mpo = md.split("### MPO on the model's own reasoning answers\n\n")[1].split("\n\n### ")[0]
    assert "| reasoning | 4 | 50.0 | 75.0 | +25.0 |" in mpo and "| count | 4 | 25.0 | 25.0 | +0.0 |" in mpo
    assert "Pairs: 7 (5 correctness, 2 truncation) from 24 answers to 3 questions, 25.0% correct." in mpo
    assert "MPO training 5.0 min" in mpo and "Sizes: MPO_STEPS=3." in mpo
    bon = md.split("### Best-of-N with the process reward model (accuracy %)\n\n")[1]
    assert bon.startswith("| task | items | greedy | one sample | majority@8 | ORM-BoN@8 | PRM-BoN@8 (mean) | pass@8 |"
                          "\n|---|---:|---:|---:|---:|---:|---:|---:|\n| reasoning | 2 | 50.0 | 40.0 | 50.0 | 50.0 | "
                          "100.0 | 100.0 |\n\nORM: the PRM reading one step;")  # fmt: skip
    assert ("| kind | solutions | steps | macro F1 | F1 wrong steps | F1 correct steps | step accuracy | first error "
            "found |\n|---|---:|---:|---:|---:|---:|---:|---:|\n| **all** | 4 | 10 | 75.0 | 50.0 | 100.0 | 90.0 | 50.0 |") in bon
    assert "PRM training 0.5 min, best-of-N 1.5 min, prm-bench 0.5 min" in bon


def test_a_demo_without_its_outputs_is_left_out(outputs):
    (outputs / "eval" / "mpo" / "summary.json").unlink()
    (outputs / "bon.json").unlink()
    md = demo_tables.tables(outputs)
    assert "### Hexagon LoRA" in md and "### MPO" not in md and "Best-of-N" not in md
    assert demo_tables.tables(outputs / "nothing") == "nothing measured yet\n"


# every step, a few items and steps each (MPO_N: enough questions that some sampled answers are right)
TINY = {"EVAL_N": "2", "HEX_N": "2", "HEX_EVAL_N": "2", "HEX_TASKS": "shape,count", "LORA_STEPS": "2",
        "MPO_N": "16", "MPO_SAMPLES": "4", "MPO_STEPS": "2", "PRM_N": "2", "PRM_STEPS": "2", "ORM_STEPS": "2",
        "BON_N": "2", "BON_K": "2", "BENCH_N": "2"}  # fmt: skip


@pytest.mark.slow
def test_demos_script_runs_every_step_and_writes_the_tables(tmp_path):
    env = {**os.environ, **TINY, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "runs" / "demos.sh"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    times = demo_tables._tsv(tmp_path / "times.tsv")
    assert set(times) == {s for steps in demo_tables.STEPS.values() for s in steps} | {"data_test"}
    for name in ("base", "lora"):
        assert len(json.loads((tmp_path / "eval" / name / "summary.json").read_text())["tasks"]) == 15
    assert "hexagon" in json.loads((tmp_path / "eval" / "lora_hex" / "summary.json").read_text())
    assert json.loads((tmp_path / "bon.json").read_text())["tasks"].keys() == {"reasoning", "count"}
    md = (tmp_path / "tables.md").read_text()
    assert md.count("### ") == 4 and "ORM: a trained outcome-only RM" in md
    # a second run finds every output and only rebuilds the tables
    again = subprocess.run(["bash", str(ROOT / "runs" / "demos.sh"), str(tmp_path)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert again.returncode == 0 and "== lora: done" in again.stdout
    assert demo_tables._tsv(tmp_path / "times.tsv") == times and (tmp_path / "tables.md").read_text() == md

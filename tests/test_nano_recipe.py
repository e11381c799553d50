"""The built-in model's recipe runs end to end on a tiny budget: runs/train_nano.sh (data, tokenizer,
curriculum, vision pretraining, every language stage, the benchmark), then `nano ship` into a folder that
loads like any checkpoint and answers."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import internvl
from internvl.nano.cli import main
from internvl.nano.ship import ship
from internvl.options import read_yaml
from internvl.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ROOT / "src" / "internvl" / "assets" / "nano"
TINY = {"N": "3", "CUR_SCALE": "0.0005", "VIT_STEPS": "1", "VIT_IMAGES": "16", "EVAL_N": "1",
        "STEPS_shapes": "1", "STEPS_stage0": "1", "STEPS_stage1a": "1", "STEPS_stage1": "1",
        "STEPS_stage1b": "1", "STEPS_vit4": "1", "VIT4_IMAGES": "3", "STEPS_stage2": "1", "STEPS_stage2b": "1",
        "STEPS_stage2c": "1", "STEPS_stage2d": "1", "STEPS_vit4b": "1", "IMAGES_vit4b": "3",
        "STEPS_stage2e": "1", "STEPS_vit4c": "1", "IMAGES_vit4c": "3", "STEPS_stage2f": "1",
        "STEPS_stage2g": "1", "STEPS_stage2h": "1", "STEPS_stage2hop": "1", "STEPS_stage2hop2": "1",
        "STEPS_stage2hop3": "1", "STEPS_stage2rc": "1",
        "STEPS_stage2rck": "1", "STEPS_stage2rc2": "1", "STEPS_stage2rp": "1", "STEPS_stage2x": "1",
        "STEPS_stage2xc": "1", "STEPS_stage2m": "1", "STEPS_stage2o": "1", "STEPS_stage2p": "1", "STEPS_stage2q": "1",
        "STEPS_stage2r": "1", "STEPS_stage2s": "1", "STEPS_stage2t": "1", "STEPS_stage2u": "1", "STEPS_stage2v": "1",
        "STEPS_stage2w": "1", "STEPS_stage2y": "1", "STEPS_stage2z": "1", "STEPS_stage2zb": "1",
        "STEPS_stage2zc": "1", "STEPS_stage2zd": "1", "STEPS_stage2ze": "1", "STEPS_stage2zi": "1",
        "STEPS_stage2zj": "1", "STEPS_stage2zk": "1", "STEPS_stage2zl": "1", "STEPS_stage2zm": "1",
        "STEPS_stage2zn": "1", "STEPS_stage2zo": "1", "STEPS_stage2zp": "1", "STEPS_stage2zq": "1",
        "COMPILE": "0", "VIT_HELD_OUT": "4", "VIT_BATCH": "4",
        "LANG_ARGS": "--grad-accum 1 --max-packed-tokens 1536 --max-packed-images 8 --no-tensorboard"}  # fmt: skip
# the shipped lineage (the script's default) and the stages that continue the shipped model after it
SHIPPED = ("shapes stage0 stage1a stage1 stage1b vit4 stage2 stage2b stage2c stage2d vit4b stage2e vit4c stage2f "
           "stage2g stage2h stage2hop stage2hop2 stage2hop3 stage2rc stage2rck stage2rc2 stage2rp stage2x stage2xc "
           "stage2m stage2o stage2p stage2q stage2r stage2s stage2t stage2u stage2w grow8 stage2y stage2z stage2zc "
           "stage2zj stage2zk stage2zl stage2zm stage2zn stage2zo stage2zp")  # fmt: skip
AFTER = "stage2zq"
# What the test runs for real: one stage of each kind, in lineage order (a language stage from the encoder, the
# tiled stage 2, the encoder's top layers and all of them unfrozen, the three vision stages again, the binding
# loss, grow8, and the 8-layer stages with every family of heads and readouts: AFTER's settings extend them all).
# A stage that only repeats another one's settings with another seed, or adds heads of a kind run here, is checked
# through the plan (`DRY_RUN=1`, every command the lineage runs, parsed as `internvl finetune` parses it) instead:
# each process costs ~6 s of imports and set-up, and the whole lineage ran 243 s of a suite that must stay under
# 10 minutes.
RUN = "shapes stage1 vit4 stage2 stage2c vit4b stage2e vit4c stage2f stage2hop grow8 stage2zc " + AFTER


def env_for(stages: str, **more: str) -> dict:
    return {**os.environ, **TINY, "STAGES": stages, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            **more}  # fmt: skip


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano")
    done = subprocess.run(["bash", str(ROOT / "runs" / "train_nano.sh"), str(out)], cwd=ROOT, env=env_for(RUN),
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """The arguments every `internvl finetune` of the shipped lineage and AFTER would run with (by stage), as the
    command parses them, and the script's other commands (lists of arguments)."""
    from internvl.cli.main import build_parser
    from internvl.train.args import from_namespace

    out = tmp_path_factory.mktemp("plan") / "nano"
    done = subprocess.run(["bash", str(ROOT / "runs" / "train_nano.sh"), str(out)], cwd=ROOT,
                          env=env_for(f"{SHIPPED} {AFTER}", DRY_RUN="1"), capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert not out.exists()  # nothing ran
    stages, other = {}, []
    for line in done.stdout.splitlines():
        argv = shlex.split(line)
        if argv[:2] == ["internvl", "finetune"]:
            args = from_namespace(build_parser().parse_args(argv[1:])).to_dict()
            stages[Path(args["out"]).name] = json.loads(json.dumps(args))  # as a checkpoint records them
        else:
            other.append(argv)
    return stages, other


def first_args(recipe: Path, stage: str) -> dict:
    """The arguments a stage's run recorded in its first checkpoint (step 1)."""
    return json.loads((recipe / stage / "checkpoints" / "step-00000001" / "state.json").read_text())["args"]


def test_every_kind_of_stage_runs_and_the_benchmark_scores_every_task(recipe, plan):
    order = RUN.split()
    language = [s for s in order if not s.startswith("vit") and s != "grow8"]
    for before, stage in zip(order, order[1:]):
        if stage in language:
            assert (recipe / stage / "final" / "model.safetensors").is_file(), stage
            args = first_args(recipe, stage)
            assert json.loads((recipe / stage / "checkpoints" / "step-00000001" / "state.json").read_text())[
                "step"] == 1  # fmt: skip
            start = "vit" if stage == order[0] else before if before.startswith("vit") or before == "grow8" \
                else f"{before}/final"  # fmt: skip
            assert args["model"].endswith(start), (stage, args["model"])
            # what ran is what the plan of the whole lineage says, but for the paths of its start and output
            planned = plan[0][stage]
            assert Path(args["data"]).name == Path(planned["data"]).name
            skip = ("model", "out", "data")
            assert {k: v for k, v in args.items() if k not in skip} == {
                k: v for k, v in planned.items() if k not in skip}, stage  # fmt: skip
    assert (recipe / "shapes" / "final" / "model.safetensors").is_file()
    assert json.loads((recipe / "vit" / "vit_pretrain.json").read_text())["steps"] == 1
    tiled = json.loads((recipe / "vit4" / "vit_pretrain.json").read_text())
    assert tiled["steps"] == 1 and tiled["images"] >= 3  # every view of the 3 images
    assert "kind_objects" not in tiled["held_out"]
    # vit4b: the encoder again, with the balanced kind loss (a held-out figure of its own)
    again = json.loads((recipe / "vit4b" / "vit_pretrain.json").read_text())
    assert again["steps"] == 1 and "kind_objects" in again["held_out"]
    args = first_args(recipe, "vit4b")
    assert args["balance_kind"] and args["init"].endswith("stage2c/final")
    # vit4c: through the projector, on vit4b's views (one cache)
    last = json.loads((recipe / "vit4c" / "vit_pretrain.json").read_text())
    assert last["steps"] == 1 and "embed_place_acc" in last["held_out"]
    args = first_args(recipe, "vit4c")
    assert args["through_projector"] and args["hold"] == 1.0 and args["init"].endswith("stage2e/final")
    assert sorted(f.name for f in recipe.glob("*.npz")) == ["views_3.npz", "vit4_data.npz", "vit_data.npz"]
    assert json.loads((recipe / "stage2" / "final" / "config.json").read_text())["max_dynamic_patch"] == 4
    for stage in ("stage2hop", "stage2zc", AFTER):
        assert all(r["bind_ce"] > 0 for r in read_metrics(recipe / stage / "metrics.csv")), stage
    # AFTER's settings extend every earlier family's: the count heads' (2t), the letter readouts' (2w), the match
    # (2o), the object readout (2zd) and the option cells' (2zh)
    logged = (recipe / AFTER / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"count_ce", "option_letter_mse", "letter_mse", "match_mse", "object_mse", "region_mse"} <= set(logged)
    # grow8: the model before it with two copies of layer 5 after it
    grown = json.loads((recipe / "grow8" / "config.json").read_text())["llm_config"]["num_hidden_layers"]
    assert grown == json.loads((recipe / "stage2hop" / "final" / "config.json").read_text())["llm_config"][
        "num_hidden_layers"] + 2  # fmt: skip
    assert not first_args(recipe, "stage2e")["compile"]  # COMPILE=0 (the recipe compiles stage 2 and later by default)
    summary = json.loads((recipe / "eval" / "summary.json").read_text())
    assert len(summary["tasks"]) == 15 and all(t["n"] == 1 for t in summary["tasks"].values())


def test_the_plan_chains_every_stage_of_the_lineage(plan):
    """Every stage of the shipped lineage and the one after it, as `DRY_RUN=1` plans it: each language stage from
    the one before, its data and its settings."""
    stages, other = plan
    order = f"{SHIPPED} {AFTER}".split()
    assert list(stages) == [s for s in order if not s.startswith("vit") and s != "grow8"]
    for before, stage in zip(order, order[1:]):
        if stage in stages:
            start = before if before.startswith("vit") or before == "grow8" else f"{before}/final"
            assert stages[stage]["model"].endswith(start), (stage, stages[stage]["model"])
            assert stages[stage]["max_steps"] == 1 and not stages[stage]["compile"]  # TINY's
    verbs = [argv[1:3] for argv in other]
    assert verbs == [["synth", "--out"], ["nano", "prepare"], ["nano", "curriculum"], ["nano", "vit"], ["nano", "vit"],
                     ["nano", "vit"], ["nano", "vit"], ["nano", "grow"], ["eval", "synthetic"]]  # fmt: skip
    vits = [argv for argv in other if argv[1:3] == ["nano", "vit"]]
    assert vits[2][vits[2].index("--init") + 1].endswith("stage2d/final") and "--balance-kind" in vits[2]
    assert vits[3][vits[3].index("--init") + 1].endswith("stage2e/final") and "--through-projector" in vits[3]
    # the lineage after stage 2: each continuation starts from the one before, on stage 1b's mixture;
    # stage 2c trains the encoder's top 3 layers too, stage 2e (after vit4b) all 6, stage 2f (after vit4c) none
    for stage, seed in (("stage2b", 5), ("stage2c", 7), ("stage2d", 8), ("stage2e", 9), ("stage2f", 11),
                        ("stage2g", 12)):  # fmt: skip
        assert stages[stage]["seed"] == seed and stages[stage]["data"].endswith("stage1b.json")
    assert stages["stage2c"]["unfreeze_vit_layers"] == -3
    args = stages["stage2e"]
    assert args["model"].endswith("vit4b") and args["unfreeze_vit_layers"] == -6 and args["lr"] == 3e-4
    args = stages["stage2f"]
    assert args["model"].endswith("vit4c") and not args["unfreeze_vit_layers"] and args["freeze_vision"]
    # stage 2h: on the binding mixture (scenes of several objects), encoder frozen
    args = stages["stage2h"]
    assert args["data"].endswith("curriculum/stage2h.json")
    assert args["seed"] == 13 and args["lr"] == 2e-4 and args["freeze_vision"]
    # stage 2hop: the same mixture with the binding loss (word and HOP heads); 2hop2 and 2hop3: more of it
    for stage, seed in (("stage2hop", 14), ("stage2hop2", 15), ("stage2hop3", 16)):
        args = stages[stage]
        assert args["data"].endswith("curriculum/stage2h.json") and args["seed"] == seed
        assert args["lr"] == 2e-4 and args["binding_loss"] == 0.1
        assert args["binding_heads"] == "1:0,2:0" and args["binding_hop_heads"] == "3:1,4:1"
    # stage 2rc: the relation (first and last mention) and count heads on top, on the same mixture
    args = stages["stage2rc"]
    assert args["data"].endswith("curriculum/stage2h.json")
    assert args["seed"] == 17 and args["binding_hop_heads"] == "3:1,4:1"
    heads = (args["binding_first_heads"], args["binding_last_heads"], args["binding_count_heads"])
    assert heads == ("3:2", "3:3", "4:2")
    assert (args["grad_accum"], args["max_packed_tokens"], args["max_packed_images"]) == (1, 1536, 8)  # LANG_ARGS
    # stage 2rck: the same heads on the mixture leaning on count questions
    args = stages["stage2rck"]
    assert args["data"].endswith("curriculum/stage2k.json")
    assert args["seed"] == 18 and args["binding_count_heads"] == "4:2"
    # stage 2rc2: a second count head that weighs <img> 4 times an object
    args = stages["stage2rc2"]
    assert args["data"].endswith("curriculum/stage2k.json")
    assert args["seed"] == 19 and args["binding_count_heads"] == "4:2,4:3"
    assert args["binding_count_sinks"] == "1,4"
    # stage 2rp: place heads onto the thumbnail tokens of the first/last-named objects
    args = stages["stage2rp"]
    assert args["data"].endswith("curriculum/stage2k.json")
    assert args["seed"] == 21 and args["binding_count_heads"] == "4:2,4:3"
    assert (args["binding_place_first_heads"], args["binding_place_last_heads"]) == ("5:0", "5:1")
    # stages 2x-2q: the place loss, the count readout, the multiple-choice lookups, the options' comparison on
    # fresh count questions, count heads at the mention, the color word
    assert stages["stage2x"]["binding_place_xy_layer"] == 5
    assert stages["stage2xc"]["binding_count_xy_layer"] == 5
    args = stages["stage2m"]
    assert args["data"].endswith("curriculum/stage2m.json") and args["binding_option_heads"] == "5:2"
    args = stages["stage2o"]
    assert args["data"].endswith("curriculum/stage2o.json") and args["binding_choice_heads"] == "3:0"
    args = stages["stage2q"]
    assert args["data"].endswith("curriculum/stage2o.json")
    assert (args["seed"], args["binding_color_heads"], args["binding_count_word_heads"]) == (30, "0:0", "2:1,2:2")
    assert (args["binding_match_xy_layer"], args["binding_count_xy_word_layer"]) == (4, 3)
    # stage 2r: a second place head for the first-named object and the letter readout, on the mixture with fresh
    # relation and position questions; 2s: without the letter readout
    args = stages["stage2r"]
    assert args["data"].endswith("curriculum/stage2r.json")
    assert (args["binding_place_first_heads"], args["binding_letter_xy_layer"], args["seed"]) == ("5:0,4:0", 5, 31)
    args = stages["stage2s"]
    assert args["data"].endswith("curriculum/stage2r.json")
    assert (args["binding_place_first_heads"], args["binding_letter_xy_layer"], args["seed"]) == ("5:0,4:0", -1, 32)
    args = stages["stage2t"]  # the count rows weigh 4 times as much, a third count head
    assert args["data"].endswith("curriculum/stage2r.json")
    assert (args["binding_count_heads"], args["binding_count_sinks"], args["binding_count_weight"]) == (
        "4:2,4:3,5:3", "1,4,2", 4.0)  # fmt: skip
    args = stages["stage2u"]  # stage 2t's settings on the mixture with the text questions 4 times over
    assert args["data"].endswith("curriculum/stage2u.json")
    assert (args["binding_count_weight"], args["seed"]) == (4.0, 35)
    args = stages["stage2w"]  # stage 2u's settings plus the letter readouts
    assert args["data"].endswith("curriculum/stage2u.json")
    assert (args["binding_option_letter_xy_layer"], args["binding_letter_xy_layer"], args["seed"]) == (4, 5, 37)
    # stage 2y trains grow8's model with the option lookup in layer 6 and stage 2w's letter readouts a layer later
    args = stages["stage2y"]
    assert args["model"].endswith("grow8") and args["data"].endswith("curriculum/stage2u.json")
    assert (args["binding_option_heads"], args["binding_option_letter_xy_layer"], args["binding_letter_xy_layer"]) == (
        "6:2", 5, 6)  # fmt: skip
    # stage 2z: stage 2y again; 2zc: that on the mixture with the tasks furthest below their targets 4 times over
    for stage, seed, data in (("stage2z", 40, "stage2u"), ("stage2zc", 42, "stage2zc")):
        args = stages[stage]
        assert args["data"].endswith(f"curriculum/{data}.json")
        assert (args["binding_option_heads"], args["seed"]) == ("6:2", seed)
        assert yaml.safe_load((ROOT / "configs" / "train" / f"nano-{stage}.yaml").read_text())["max_steps"] == 500
    # 2zj (run 47, shipped before): from 2zc, 2zi's readouts (runs/train_nano.sh: the object readout at layer 1 weighing
    # 0.3, the region readout) with the mentions' place at layer 2 and the options' cells at layer 3, no box readout;
    # 2zk (run 48): 2zj again from it, another seed; 2zl (run 49): 2zk at half the peak; 2zm (run 50): 2zl again,
    # another seed; 2zn (run 51): 2zm over 1,000 steps from 5e-5; 2zo (run 52): 2zm's settings with fresh
    # position multiple-choice questions in the mixture; 2zp (run 53, shipped): 2zo at 2zn's peak; 2zq (AFTER): 2zp
    # again, another seed
    for stage, seed, lr, steps, data in (("stage2zj", 48, 2e-4, 500, "stage2zc"), ("stage2zk", 49, 2e-4, 500, "stage2zc"),
                                         ("stage2zl", 50, 1e-4, 500, "stage2zc"), ("stage2zm", 51, 1e-4, 500, "stage2zc"),
                                         ("stage2zn", 52, 5e-5, 1000, "stage2zc"), ("stage2zo", 53, 1e-4, 500, "stage2zo"),
                                         ("stage2zp", 54, 5e-5, 500, "stage2zo"),
                                         (AFTER, 55, 5e-5, 500, "stage2zo")):  # fmt: skip
        args = stages[stage]
        assert args["data"].endswith(f"curriculum/{data}.json") and (args["seed"], args["lr"]) == (seed, lr)
        config = read_yaml(ROOT / "configs" / "train" / f"nano-{stage}.yaml", ValueError)  # with what it extends
        assert config["max_steps"] == steps, stage
        assert (args["binding_box_xy_layer"], args["binding_object_xy_layer"], args["binding_object_xy_weight"],
                args["binding_place_xy_word_layer"], args["binding_region_xy_layer"]) == (-1, 1, 0.3, 2, 3)  # fmt: skip
    assert stages["stage2zc"]["binding_object_xy_layer"] == -1


def test_ship_writes_a_loadable_model_with_its_training_record(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr("internvl.nano.ship.CHECK_N", 2)  # 2 check items a task (the shipped model's: 5)
    dest = ship(recipe / "stage1" / "final", "stage1", recipe / "eval" / "summary.json", hours=0.01,
                     dest=tmp_path / "nano")  # fmt: skip
    info = json.loads((dest / "training.json").read_text())
    assert info["stage"] == "stage1" and info["step"] == 1 and info["training_hours"] == 0.01
    assert set(info["test_split"]["accuracy_percent"]) == set(json.loads(
        (recipe / "eval" / "summary.json").read_text())["tasks"])  # fmt: skip
    for name in ("model.safetensors", "tokenizer.json"):  # the weights ship unchanged
        assert (dest / name).read_bytes() == (recipe / "stage1" / "final" / name).read_bytes()
    model = internvl.load(str(dest))
    assert model.config.processor.max_dynamic_patch == 1 and model.tokenizer.vocab_size > 100
    assert set(info["check"]["correct"]) == set(info["test_split"]["accuracy_percent"])  # every task checked
    assert info["check"]["n"] == 2 and all(0 <= k <= 2 for k in info["check"]["correct"].values())
    # an explicit step wins over the checkpoint beside the folder (the check items were answered above)
    monkeypatch.setattr("internvl.nano.ship.check", lambda *args, **kwargs: {})
    again = ship(recipe / "stage1" / "final", "stage1", dest=tmp_path / "again", step=7)
    assert json.loads((again / "training.json").read_text())["step"] == 7
    # a later stage can start from the shipped folder like from any checkpoint
    assert (dest / "config.json").read_text() == (recipe / "stage1" / "final" / "config.json").read_text()


def test_ship_refuses_an_incomplete_folder(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert main(["ship", str(tmp_path / "m"), "--stage", "stage1", "--dest", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json: missing" in err


def test_the_script_defaults_to_the_shipped_lineage():
    """Without STAGES the script runs the shipped model's lineage (which the plan test checks stage by stage)."""
    script = (ROOT / "runs" / "train_nano.sh").read_text()
    default = script.split('STAGES=${STAGES:-"', 1)[1].split('"', 1)[0]
    assert " ".join(default.split()) == SHIPPED


def test_the_readout_stages_after_the_shipped_model_plan_their_settings(tmp_path):
    """Stages 2zf-2zh (runs 43-45), 2zi, 2zj and 2zl (runs 46, 47 and 49) from the shipped model, as `DRY_RUN=1`
    plans them: each from the one before (2zi, 2zj and 2zl from the shipped model itself), on its mixture, with its
    readouts, peak and seed."""
    from internvl.cli.main import build_parser
    from internvl.train.args import from_namespace

    def planned(stages: str) -> list[dict]:  # the finetune arguments of STAGES from the shipped model, by stage
        done = subprocess.run(["bash", str(ROOT / "runs" / "train_nano.sh"), str(tmp_path / stages.replace(" ", "-"))],
                              cwd=ROOT, env=env_for(stages, DRY_RUN="1", START=str(BUILTIN)),
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs = [shlex.split(line) for line in done.stdout.splitlines() if line.startswith("internvl finetune")]
        return [from_namespace(build_parser().parse_args(argv[1:])).to_dict() for argv in runs]

    # 2zd (run 41, from the model before): 2zc with grounding 3 times over that, the box readout at layer 5 and the
    # object readout at layer 1
    (d,) = planned("stage2zd")
    assert Path(d["data"]).name == "stage2zd.json" and d["seed"] == 43 and d["binding_option_heads"] == "6:2"
    assert (d["binding_box_xy_layer"], d["binding_object_xy_layer"]) == (5, 1)
    assert yaml.safe_load((ROOT / "configs" / "train" / "nano-stage2zd.yaml").read_text())["max_steps"] == 500
    stages = planned("stage2zf stage2zg stage2zh")
    assert [Path(a["out"]).name for a in stages] == ["stage2zf", "stage2zg", "stage2zh"]
    assert stages[0]["model"] == str(BUILTIN) and stages[1]["model"].endswith("stage2zf/final")
    assert stages[2]["model"].endswith("stage2zg/final")
    got = [(Path(a["data"]).name, a["seed"], a["binding_box_xy_layer"], a["binding_object_xy_layer"],
            a["binding_object_xy_weight"], a["binding_region_xy_layer"]) for a in stages]  # fmt: skip
    assert got == [("stage2zd.json", 43, -1, 1, 1.0, -1), ("stage2zc.json", 45, -1, 1, 0.3, -1),
                   ("stage2zc.json", 46, -1, 1, 0.3, 5)]  # fmt: skip
    # stage 2zi (run 46): 2zh's readouts in one stage straight from the shipped model, another seed
    (a,) = planned("stage2zi")
    assert a["model"] == str(BUILTIN) and Path(a["out"]).name == "stage2zi"
    assert (Path(a["data"]).name, a["seed"], a["binding_box_xy_layer"], a["binding_object_xy_layer"],
            a["binding_object_xy_weight"], a["binding_region_xy_layer"]) == ("stage2zc.json", 47, -1, 1, 0.3, 5)
    # stage 2zj (run 47): 2zi with the mentions' place at layer 2 and the options' cells at layer 3
    (b,) = planned("stage2zj")
    assert b["model"] == str(BUILTIN) and Path(b["data"]).name == "stage2zc.json" and b["seed"] == 48
    assert (b["binding_place_xy_word_layer"], b["binding_region_xy_layer"], b["binding_match_xy_layer"]) == (2, 3, 4)
    own = ("out", "data", "seed", "binding_place_xy_word_layer", "binding_region_xy_layer")
    assert a["binding_place_xy_word_layer"] == -1
    assert {k: v for k, v in b.items() if k not in own} == {k: v for k, v in a.items() if k not in own}
    # stage 2zl (run 49): 2zk's settings at half the peak, another seed
    (c,) = planned("stage2zl")
    assert c["model"] == str(BUILTIN) and Path(c["data"]).name == "stage2zc.json"
    assert (c["lr"], c["seed"], c["binding_place_xy_word_layer"], c["binding_region_xy_layer"]) == (1e-4, 50, 2, 3)

"""MODEL as a Hugging Face Hub id, resolved by huggingface_hub from a Hub cache made here (offline: no network):
the snapshot of a revision, every verb that takes MODEL, and one line when the id is not cached."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from refmodels import tiny_checkpoint

from internvl.checkpoint.hub import ALLOW_PATTERNS, is_hub_id, resolve_model
from internvl.cli.main import main as cli
from internvl.errors import CheckpointError

REPO = "tester/tiny-internvl"
MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache as huggingface_hub lays it out: models--tester--tiny-internvl/{refs/main, refs/v1,
    snapshots/<commit>/...}; main holds the counting model, v1 the random one."""
    root = tmp_path_factory.mktemp("hf")
    made = {MAIN: tiny_checkpoint(root / "main", counting=True), V1: tiny_checkpoint(root / "v1")}
    repo = root / "hub" / "models--tester--tiny-internvl"
    (repo / "refs").mkdir(parents=True)
    for commit, folder in made.items():
        shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    return root / "hub", made


@pytest.fixture
def offline(hub, monkeypatch):
    """This process sees the cache and no network, as `HF_HUB_CACHE=... HF_HUB_OFFLINE=1` would set it up."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub[0]))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def env_offline(cache) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def run_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "internvl", *args], capture_output=True, text=True, timeout=300,
                          env=env, check=False)  # fmt: skip


def test_resolves_main_a_branch_and_a_commit_from_the_cache(offline):
    cache = offline[0]
    snapshots = cache / "models--tester--tiny-internvl" / "snapshots"
    assert resolve_model(REPO) == snapshots / MAIN
    assert resolve_model(REPO, revision="v1") == snapshots / V1
    assert resolve_model(REPO, revision=V1) == snapshots / V1


def test_chat_with_a_hub_id_answers_as_the_folder_does(hub):
    cache, made = hub
    common = ["-p", "red", "--max-new-tokens", "5", "--device", "cpu", "--no-stream"]
    by_id = run_cli("chat", REPO, *common, env=env_offline(cache))
    assert by_id.returncode == 0, by_id.stderr
    by_folder = run_cli("chat", str(made[MAIN]), *common, env=env_offline(cache))
    assert by_id.stdout == by_folder.stdout and by_id.stdout.strip()
    v1 = run_cli("chat", REPO, "--revision", "v1", *common, env=env_offline(cache))
    assert v1.returncode == 0 and v1.stdout == run_cli("chat", str(made[V1]), *common, env=env_offline(cache)).stdout


def test_not_cached_and_offline_is_one_line_that_says_what_to_do(hub, tmp_path):
    proc = run_cli("chat", "tester/not-here", "-p", "hi", "--device", "cpu", env=env_offline(hub[0]))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("internvl chat: error: tester/not-here: no such model folder, and the Hub model")
    assert "not in the Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
    assert "download it once with network access, or give a local folder" in lines[0]
    proc = run_cli("chat", REPO, "--revision", "v9", "-p", "hi", "--device", "cpu", env=env_offline(hub[0]))
    assert proc.returncode == 1 and "at revision 'v9' is not in the Hugging Face cache" in proc.stderr


def test_every_verb_that_takes_model_takes_a_hub_id(offline, tmp_path, capsys):
    from internvl.train.args import TrainArgs
    from internvl.train.run import _resolve_hub_model

    snapshot = offline[0] / "models--tester--tiny-internvl" / "snapshots" / MAIN
    assert cli(["convert", REPO, str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists() and f"converted {snapshot}" in capsys.readouterr().out
    args = TrainArgs.from_dict({"model": REPO, "revision": "v1", "data": "meta.json", "out": str(tmp_path / "o")})
    assert _resolve_hub_model(args).model.model == str(snapshot.parent / V1)
    import internvl

    assert internvl.load(REPO, revision="v1").path == snapshot.parent / V1


def test_revision_with_a_local_folder_or_the_builtin_model_is_one_line(hub, capsys):
    folder = str(hub[1][MAIN])
    assert cli(["chat", folder, "--revision", "v1", "-p", "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"internvl chat: error: {folder}: a local folder has no revisions; --revision is for Hub "
                    f"model ids")]  # fmt: skip
    with pytest.raises(CheckpointError, match="a local folder has no revisions"):
        resolve_model(folder, revision="v1")


@pytest.mark.parametrize(
    "name, hub_id",
    [("OpenGVLab/InternVL3-1B", True), ("runs/nowhere-yet", True), ("./x/y", False), ("a/b/c", False),
     ("/abs/path", False), ("../up/model", False), ("model", False), ("a/b.", False)],
)  # fmt: skip
def test_what_counts_as_a_hub_id(name, hub_id):
    assert is_hub_id(name) is hub_id


def test_a_missing_folder_that_is_no_hub_id_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path))}/nowhere: no such model folder$"):
        resolve_model(str(tmp_path / "nowhere"))


def test_only_weights_config_and_tokenizer_files_are_downloaded():
    from huggingface_hub.utils import filter_repo_objects

    listing = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "merges.txt", "chat_template.jinja", "adapter_config.json", "adapter_model.safetensors",
               "pytorch_model.bin", "modeling_internvl_chat.py", "conversation.py", "README.md", "examples/image1.jpg",
               "runs/events.out.tfevents", ".gitattributes", "model.gguf"]  # fmt: skip
    kept = set(filter_repo_objects(listing, allow_patterns=ALLOW_PATTERNS))
    assert kept == set(listing[:15])

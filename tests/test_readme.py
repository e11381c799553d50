"""The README's examples run: its Python blocks (the API, and the OpenAI client against the server) and the
`internvl` commands of "Using it", each on a tiny random model, with flags added only to make them quick.
(The quick start, which uses the built-in model, is test_cli_readme's and test_builtin_model's.)"""

from __future__ import annotations

import base64
import io
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image
from refmodels import tiny_checkpoint

import internvl
from internvl.cli.main import main as cli
from internvl.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# added after a README command so that it runs in seconds on the tiny model (argparse: the last flag wins)
QUICK = {
    "synth": ["--n", "2"],
    "finetune": ["--max-steps", "2", "--save-every", "0", "--num-workers", "0", "--threads", "1",
                 "--max-seq-length", "256", "--no-tensorboard", "--log-every", "1"],
    "chat": ["--max-new-tokens", "4"],
    "eval": ["--max-new-tokens", "4", "--batch-size", "2"],
    "merge-lora": [],
}  # fmt: skip
# README commands this test does not run, and why
NOT_RUN = {
    "serve": "a server that runs until stopped: the Serving block's Python runs against the same app",
    "eval synthetic": "generates and scores the synthetic split (minutes): test_eval_runner runs it small",
}


def section(title: str) -> str:
    """The text of the README section `### title` (up to the next heading)."""
    match = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^#{{2,3}} )", README, re.MULTILINE | re.DOTALL)
    assert match, f"the README has no section '### {title}'"
    return match.group(1)


def blocks(title: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section(title), re.DOTALL)


def commands(title: str) -> list[list[str]]:
    """The `internvl` commands of a section's bash blocks, comments dropped."""
    out = []
    for block in blocks(title, "bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "internvl":
                out.append(words[1:])
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("readme") / "tiny")


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A folder with the repository's examples/ and configs/, as the README's relative paths expect."""
    for name in ("examples", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def quick_load(tiny):
    """`internvl.load` on the tiny model, whatever path it is given, with short answers by default."""
    real = internvl.load

    def load(path=None, **kwargs):
        model = real(tiny, **kwargs)
        model.defaults = SamplingParams(max_new_tokens=8)
        return model

    return load


def test_the_python_example_runs(tiny, workdir, monkeypatch, capsys):
    (code,) = blocks("Python", "python")
    assert "internvl.load()" in code and '["a.png", "b.png"]' in code
    for name, color in (("a.png", "red"), ("b.png", "blue")):  # the two images it names as placeholders
        Image.new("RGB", (90, 60), color).save(workdir / name)
    monkeypatch.setattr(internvl, "load", quick_load(tiny))
    exec(compile(code, "README.md (Python)", "exec"), {})  # noqa: S102 (the README's own code)
    assert capsys.readouterr().out.strip()


def test_the_openai_client_example_runs_against_the_server(tiny, workdir):
    from internvl.serve.app import ServeSettings, create_app
    from internvl.serve.server import serve_in_thread

    (code,) = blocks("Serving", "python")
    buf = io.BytesIO()
    Image.open(ROOT / "examples" / "circles.png").save(buf, "PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert "data:image/png;base64,..." in code and "http://127.0.0.1:8000/v1" in code
    llm = quick_load(tiny)()
    with serve_in_thread(create_app(llm, ServeSettings(model_name="tiny"))) as url:
        code = code.replace("data:image/png;base64,...", image).replace("http://127.0.0.1:8000", url)
        scope: dict = {}
        exec(compile(code, "README.md (Serving)", "exec"), scope)  # noqa: S102
    reply = scope["reply"]
    assert reply.model == "tiny" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens >= 1


def _mmbench(path: Path) -> None:
    """Two MMBench-style rows (question, options A-D, answer, category, base64 image)."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, "PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]
    rows = [[i, "What color is it?", "", "red", "blue", "", "", "A", "color", "l", "dev", image] for i in range(2)]
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")


def _runnable(words: list[str], tiny: Path) -> list[str] | None:
    """The README command as run here: the tiny model for MODEL or BASE, and the QUICK flags."""
    verb = words[0]
    if verb in NOT_RUN or " ".join(words[:2]) in NOT_RUN:
        return None
    assert verb in QUICK, f"README command `internvl {' '.join(words)}`: add it to QUICK or NOT_RUN"
    rest = [str(tiny) if w == "BASE" else w for w in words[1:]]
    if verb in ("finetune", "eval") and (not rest or rest[0].startswith("-")):
        rest = [str(tiny), *rest]  # the README uses the built-in model there
    return [verb, *rest, *QUICK[verb]]


def test_the_command_line_examples_run(tiny, workdir):
    torch.manual_seed(0)
    ran = []
    for title in ("Fine-tuning", "Evaluation"):
        for words in commands(title):
            argv = _runnable(words, tiny)
            if argv is None:
                continue
            if argv[0] == "eval":
                for i, w in enumerate(argv[:-1]):
                    if w == "--data":
                        _mmbench(workdir / argv[i + 1])
            assert cli(argv) == 0, f"README command `internvl {' '.join(words)}` failed"
            ran.append(argv[0])
    assert ran == ["synth", "finetune", "chat", "merge-lora", "eval"]
    assert (workdir / "merged" / "config.json").is_file()
    assert any((workdir / "eval_out").rglob("summary.json"))

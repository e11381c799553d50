"""The package's import graph, read from the source (nothing imported): no cycle between modules and no import from a
lower floor to a higher one; imports between two rooms of one floor only where ALLOWED says why (issue 15).
`importlib.import_module` calls are not seen; the package uses them only within a room (cli/main.py, train/)."""

from __future__ import annotations

import ast
from pathlib import Path

import internvl

PACKAGE = Path(internvl.__file__).parent

# Rooms (the first name under internvl/: a folder or a top-level module), floor by floor, low to high.
FLOORS = [
    {"errors", "config", "config_checks", "tokenizer", "presets", "options", "efficiency"},  # words, shapes, options
    {"model", "checkpoint", "processing", "kernels", "synth"},  # the inference core, and the synthetic data
    {"engine"},  # generation on token ids
    {"api", "__init__"},  # the Python API (the package's own `internvl.load` is the API)
    {"serve", "eval", "train", "nano", "mpo", "prm"},  # applications of the API and of the model
    {"cli", "__main__"},  # the console
]
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}

# (from room, to room): why a room may import another of its own floor. Anything else on one floor is refused.
ALLOWED = {
    ("config", "errors"): "every room raises the package's errors",
    ("config_checks", "errors"): "every room raises the package's errors",
    ("tokenizer", "errors"): "every room raises the package's errors",
    ("presets", "errors"): "every room raises the package's errors",
    ("options", "errors"): "every room raises the package's errors",
    ("efficiency", "errors"): "every room raises the package's errors",
    ("presets", "config"): "a preset is a ModelConfig",
    ("config", "config_checks"): "the dataclasses validate their fields with the shared checks",
    ("checkpoint", "model"): "a checkpoint layout builds the model it loads and maps its tensors",
    ("mpo", "train"): "MPO is a training objective run by the one training loop, on its data rows",
    ("mpo", "eval"): "preference pairs are judged by the synthetic benchmark's scoring",
    ("nano", "train"): "the built-in model is trained by the one training loop",
    ("prm", "eval"): "best-of-N asks a synthetic split's items and judges answers with the benchmark's scoring",
    ("prm", "train"): "the step evaluation reads PRM rows through the fine-tuning meta reader",
    ("nano", "eval"): "the recipe measures its model on the synthetic benchmark",
    ("__init__", "api"): "`internvl.load` is the API's load, imported on first use (internvl/__init__.py)",
    ("__main__", "cli"): "`python -m internvl` is the console",
}


def module_name(path: Path) -> str:
    parts = ["internvl", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (top level, in functions, under
    TYPE_CHECKING): `from a import b` counts as a.b when that is a module, else as a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import internvl.x.y` of a name inside a module: that module
                t = t.rpartition(".")[0]
            if t.startswith("internvl") and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_relative_absolute_and_function_level_imports():
    edges = graph()
    assert "internvl.errors" in edges["internvl.config"]  # from .errors import ... (top level)
    assert "internvl.eval.items" in edges["internvl.eval.runner"]  # from internvl.eval.items import ...
    assert "internvl.checkpoint.adapter" in edges["internvl.api"]  # inside load()
    assert "internvl.api" in edges["internvl"]  # from . import api, inside __getattr__


def test_every_room_has_a_floor():
    rooms = {room(m) for m in graph()}
    assert rooms <= set(FLOOR), f"rooms without a floor in FLOORS: {sorted(rooms - set(FLOOR))}"
    assert {pair for pair in ALLOWED if FLOOR[pair[0]] != FLOOR[pair[1]]} == set(), "ALLOWED is for one floor"


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            a, b = room(module), room(target)
            if a == b or FLOOR[a] > FLOOR[b]:
                continue
            if FLOOR[a] < FLOOR[b]:
                bad.append(f"{module} -> {target} (up: {a} is below {b})")
            elif (a, b) not in ALLOWED:
                bad.append(f"{module} -> {target} (sideways: {a} -> {b} is not in ALLOWED)")
    return bad


def test_the_checks_catch_what_they_are_for():
    edges = {"internvl.model.vlm": {"internvl.api", "internvl.errors"}, "internvl.serve.app": {"internvl.eval.tasks"},
             "internvl.mpo.data": {"internvl.train.data"}, "internvl.eval.a": {"internvl.eval.b"}, "internvl.eval.b": {"internvl.eval.a"}}  # fmt: skip
    assert violations(edges) == ["internvl.model.vlm -> internvl.api (up: model is below api)",
                                 "internvl.serve.app -> internvl.eval.tasks (sideways: serve -> eval is not in ALLOWED)"]  # fmt: skip
    assert cycles(edges) == [["internvl.eval.a", "internvl.eval.b"]]


def test_no_import_goes_up_or_sideways_without_a_reason():
    bad = violations(graph())
    assert not bad, "imports against the floors:\n  " + "\n  ".join(bad)


def test_no_cycles_between_modules():
    found = cycles(graph())
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


# pyproject.toml's `train` extra, and the verbs that a `pip install internvl` without extras runs
TRAIN_EXTRA = ("peft", "matplotlib", "tensorboard", "torch.utils.tensorboard")
INFERENCE = ("internvl.api", "internvl.cli.chat", "internvl.cli.merge_lora", "internvl.cli.convert", "internvl.cli.serve",
             "internvl.cli.eval")  # fmt: skip


def external(path: Path) -> set[str]:
    """Every module outside the package that a file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if not m.startswith("internvl")}


def test_inference_needs_no_training_extra():
    """What chat, serve, eval, convert and merge-lora reach never imports PEFT, matplotlib or TensorBoard."""
    edges, files = graph(), modules()
    seen, todo = set(), list(INFERENCE)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(edges[m])
    bad = sorted(f"{m} imports {x}" for m in seen for x in external(files[m])
                 if any(x == e or x.startswith(e + ".") for e in TRAIN_EXTRA))  # fmt: skip
    assert not bad, "inference needs the training extra:\n  " + "\n  ".join(bad)
    assert not {room(m) for m in seen} & {"train", "mpo", "nano"}


def test_allowed_pairs_are_all_used():
    used = {(room(m), room(t)) for m, ts in graph().items() for t in ts}
    assert set(ALLOWED) <= used, f"ALLOWED pairs no import needs any more: {sorted(set(ALLOWED) - used)}"

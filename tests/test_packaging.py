"""What a non-editable install gets: the wheel built from this source tree ships every kernel source and header
(pyproject's package-data), and every kernel variant compiles from the wheel's copy (issue 16), and the
generator's fonts (issue 14)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from internvl.kernels import build

ROOT = Path(__file__).resolve().parents[1]


def _copy_project(dst: Path) -> None:
    """pyproject.toml, README.md and src/ without the built-in model (tens of MB the wheel test does not need;
    the assets glob still matches the fonts) or caches: the build then writes nothing here."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "*.o")
    shutil.copytree(ROOT / "src", dst / "src", ignore=skip)
    nano = dst / "src" / "internvl" / "assets" / "nano"
    if nano.exists():
        shutil.rmtree(nano)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec("setuptools") is None:  # (setuptools >= 70.1 builds wheels by itself)
        pytest.skip("setuptools is needed to build a wheel offline (--no-build-isolation)")
    tmp = tmp_path_factory.mktemp("wheel")
    project, out = tmp / "project", tmp / "dist"
    project.mkdir()
    _copy_project(project)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(out), str(project)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, f"pip wheel failed:\n{res.stderr[-3000:]}"
    wheels = list(out.glob("internvl-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_every_kernel_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("internvl/kernels/") and n[-2:] in (".c", ".h")}
    assert set(build.KERNEL_FILES) <= shipped, f"missing from the wheel: {set(build.KERNEL_FILES) - shipped}"
    # every #include "..." of a shipped source is shipped too
    for src in (build.HERE / f for f in build.KERNEL_FILES):
        for line in src.read_text().splitlines():
            if line.startswith('#include "'):
                assert line.split('"')[1] in shipped, f"{src.name} includes {line} which the wheel lacks"


def test_wheel_ships_the_generator_fonts(wheel):
    from internvl.synth.render import FONT_DIR, FONT_FACES

    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"internvl/assets/fonts/{p.name}" for p in FONT_DIR.iterdir()}  # the faces, licences, NOTICE.md
    assert {f"internvl/assets/fonts/{f}" for f in FONT_FACES} < wanted <= names, sorted(wanted - names)


@pytest.mark.skipif(shutil.which("gcc") is None or build.cpu_flags()[0] is None,
                    reason="needs gcc on Linux x86-64")
def test_kernels_compile_from_the_wheel(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if n.startswith("internvl/kernels/"):
                z.extract(n, tmp_path)
    src = tmp_path / "internvl" / "kernels"
    for variant in build.VARIANTS.values():
        objs = build.compile_objects(variant, shutil.which("gcc"), src, str(tmp_path / variant.name))
        assert all(Path(o).stat().st_size > 0 for o in objs)
    assert not any(p.suffix == ".so" for p in src.iterdir())  # only objects were built, beside the wheel's copy

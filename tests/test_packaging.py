"""The product as a user gets it: the installed wheel trains from any directory, ``import localsgd``
exposes the engine's companions, and the README's own-loop example runs as shown.

The wheel test builds from a copy of the sources (the checkout stays untouched: no ``build/``) and
installs into a new virtual environment that borrows this one's dependencies through a ``.pth`` line.
Such a line only puts the directory on ``sys.path``; the ``.pth`` files inside it (among them the
editable install's finder) are not processed, so the new environment sees no ``localsgd`` but its own.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from .distributed import free_port
from .launch_helpers import ROOT, env_for

EXAMPLE = ROOT / "examples" / "own_loop.py"
# What the wheel is built from, as in the Dockerfiles' wheel stage.
WHEEL_SOURCES = ("pyproject.toml", "README.md", "MANIFEST.in", "build_backend", "localsgd", "configs")


def clean_env(tmp: Path) -> dict[str, str]:
    """The launch environment of the tests, minus anything that would point Python or Hydra at the checkout."""
    env = env_for(tmp)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "LOCALSGD_CONFIG_DIR", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def executable(bin_dir: Path, name: str) -> Path:
    """A program in a virtual environment's scripts folder (``name.exe`` on Windows)."""
    return bin_dir / (f"{name}.exe" if os.name == "nt" else name)


def report(proc: subprocess.CompletedProcess[str]) -> str:
    return f"{proc.args}\nrc={proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


# ---------------------------------------------------------------------------------------------- fast


def _wheel_stage_copies(dockerfile: Path) -> list[str]:
    """The source paths a Dockerfile's ``AS wheel`` stage copies (its COPY lines, flags dropped)."""
    copies, in_stage = [], False
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            in_stage = words[-2:] == ["AS", "wheel"]
        elif in_stage and words[:1] == ["COPY"]:
            copies += [w for w in words[1:-1] if not w.startswith("--")]
    return copies


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_the_dockerfiles_build_the_wheel_from_what_the_wheel_test_builds_and_run_the_main_job(name: str) -> None:
    # No Docker engine runs here: the image's wheel stage is held to the sources the wheel test below
    # builds and installs (one list), and its command to the main job under torchrun.
    dockerfile = ROOT / name
    assert sorted(_wheel_stage_copies(dockerfile)) == sorted(WHEEL_SOURCES)
    assert "pip wheel --no-deps" in dockerfile.read_text()
    (cmd,) = [json.loads(line[4:]) for line in dockerfile.read_text().splitlines() if line.startswith("CMD ")]
    if cmd[:1] == ["bash"]:  # the GPU image: the launch script, one worker per GPU
        script = (ROOT / cmd[1]).read_text()
        assert "torchrun" in script and "-m localsgd.train" in script
    else:
        assert cmd[:1] == ["torchrun"] and cmd[-2:] == ["-m", "localsgd.train"]


def test_import_localsgd_exposes_the_engine_companions(tmp_path: Path) -> None:
    probe = ("import localsgd, sys; "
             "localsgd.outer.NesterovOuter(); localsgd.schedules.Fixed(8); localsgd.engine.LocalSGD; "
             "localsgd.ramps.RAMPS; localsgd.dist.init; localsgd.errors.ConfigError; "
             "assert 'localsgd.data' not in sys.modules, 'import localsgd should not load the datasets'; "
             "localsgd.models.MODELS; localsgd.data.DATASETS; "
             "assert {'outer', 'schedules', 'ramps', 'engine', 'models'} <= set(dir(localsgd)); print('ok')")
    proc = run([sys.executable, "-c", probe], tmp_path, clean_env(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", report(proc)


@pytest.mark.parametrize("first", ["localsgd.outer", "localsgd.ramps", "localsgd.engine", "localsgd.schedules",
                                   "localsgd.train"])
def test_a_subpackage_imported_first_meets_no_import_cycle(tmp_path: Path, first: str) -> None:
    proc = run([sys.executable, "-c", f"import {first}, localsgd; localsgd.outer.NesterovOuter"], tmp_path,
               clean_env(tmp_path))
    assert proc.returncode == 0, report(proc)


def test_pyproject_lists_every_package_and_maps_the_configs() -> None:
    tomllib = pytest.importorskip("tomllib")
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "localsgd").rglob("__init__.py")}
    assert set(setuptools_cfg["packages"]) == on_disk | {"localsgd.configs"}
    assert setuptools_cfg["package-dir"] == {"localsgd.configs": "configs"}


def test_config_dir_prefers_the_environment_then_the_checkout(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    from localsgd.train import config_dir

    monkeypatch.delenv("LOCALSGD_CONFIG_DIR", raising=False)
    assert Path(config_dir()) == ROOT / "configs"
    monkeypatch.setenv("LOCALSGD_CONFIG_DIR", str(tmp_path))
    assert config_dir() == str(tmp_path)


def test_readme_engine_snippet_is_an_excerpt_of_the_example() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The engine in your own loop", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    example_lines = set(EXAMPLE.read_text().splitlines())
    shown = [line for line in snippet.splitlines() if line.strip() not in ("", "...")]
    # The excerpt is dedented where the example's code sits inside main().
    missing = [line for line in shown if not any(indent + line in example_lines for indent in ("", "    "))]
    assert not missing, f"README lines not in {EXAMPLE.name}: {missing}"
    assert "torchrun --standalone --nproc_per_node=2 examples/own_loop.py" in section


# ---------------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the copy of the sources, the wheel ``pip wheel`` built from it)."""
    for needed in ("pip", "setuptools"):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"cannot build a wheel here: {needed} is not installed in this interpreter")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env = clean_env(tmp)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "--wheel-dir", str(tmp / "dist"), str(src)], tmp, env, timeout=180)
    assert built.returncode == 0, report(built)
    (wheel,) = (tmp / "dist").glob("localsgd-*.whl")
    return src, wheel


@pytest.mark.slow
def test_building_the_wheel_leaves_the_source_tree_as_it_was(built_wheel: tuple[Path, Path]) -> None:
    src, _ = built_wheel
    assert sorted(p.name for p in src.iterdir()) == sorted(WHEEL_SOURCES)  # no build/, no localsgd.egg-info


@pytest.fixture(scope="module")
def installed_wheel(built_wheel: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with the wheel built from this checkout installed; its ``bin`` folder."""
    _, wheel = built_wheel
    tmp = tmp_path_factory.mktemp("venv")
    env = clean_env(tmp)
    target = tmp / "venv"
    try:
        venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(target)
    except Exception as exc:  # any failure here means this platform cannot make a venv
        pytest.skip(f"cannot create a virtual environment here: {exc}")
    bin_dir = target / ("Scripts" if os.name == "nt" else "bin")
    python = executable(bin_dir, "python")
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env)
    assert site.returncode == 0, report(site)
    borrowed = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site.stdout.strip()) / "borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in borrowed))

    # The premise of the test: the dependencies are visible, this checkout's localsgd is not.
    probe = "import importlib.util as u; print([u.find_spec(m) is not None for m in ('torch', 'hydra', 'localsgd')])"
    seen = run([str(python), "-c", probe], tmp, env)
    assert seen.stdout.strip() == "[True, True, False]", report(seen)

    # The borrowed pip runs under the new interpreter, so it installs there (entry points included);
    # --ignore-installed: never touch the localsgd it can see in the borrowed directory's metadata.
    installed = run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                     str(wheel)], tmp, env, timeout=180)
    assert installed.returncode == 0, report(installed)
    return bin_dir


@pytest.mark.slow
def test_installed_wheel_imports_its_own_copy_and_finds_packaged_configs(installed_wheel: Path,
                                                                          tmp_path: Path) -> None:
    probe = ("import json, localsgd, localsgd.train; "
             "print(json.dumps([localsgd.__file__, localsgd.train.config_dir()]))")
    proc = run([str(executable(installed_wheel, "python")), "-c", probe], tmp_path, clean_env(tmp_path))
    assert proc.returncode == 0, report(proc)
    package_file, configs = (Path(p) for p in json.loads(proc.stdout.strip().splitlines()[-1]))
    venv_root = installed_wheel.parent.resolve()
    assert package_file.resolve().is_relative_to(venv_root), package_file
    assert Path(configs).resolve().is_relative_to(venv_root), configs
    shipped = {p.relative_to(configs).as_posix() for p in Path(configs).rglob("*.yaml")}
    assert shipped == {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}


@pytest.mark.long
@pytest.mark.slow
def test_installed_wheel_trains_the_smoke_job_from_any_directory(installed_wheel: Path, tmp_path: Path) -> None:
    entry_point = executable(installed_wheel, "localsgd-train")
    env = clean_env(tmp_path)
    helped = run([str(entry_point), "--help"], tmp_path, env)
    assert helped.returncode == 0 and "trainer" in helped.stdout, report(helped)
    trained = run([str(entry_point), "trainer=smoke"], tmp_path, env, timeout=180)
    assert trained.returncode == 0, report(trained)
    (summary_file,) = (tmp_path / "outputs" / "runs").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["steps"] == 40 and summary["world_size"] == 1 and math.isfinite(summary["final_eval_loss"])


@pytest.mark.slow
def test_own_loop_example_trains_two_ranks_to_identical_replicas(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--monitor-interval=0.5", str(EXAMPLE)]
    proc = run(cmd, tmp_path, clean_env(tmp_path), timeout=180)
    assert proc.returncode == 0, report(proc)
    out = proc.stdout
    assert "world size 2, 250 local steps per rank, H = 8: 32 averaging rounds" in out, report(proc)
    assert "replicas identical: True" in out, report(proc)
    initial, final = (float(v) for v in re.search(r"held-out loss: (\S+) -> (\S+)", out).groups())
    assert math.isfinite(final) and final < 0.1 * initial, (initial, final)


def test_leave_flushes_and_exits_with_the_code_without_finalisation(tmp_path: Path) -> None:
    """``localsgd.dist.leave`` (the end of our own-loop example and of the trainer) keeps output and exit code."""
    script = ("import atexit, sys, localsgd.dist as d\n"
              "atexit.register(lambda: print('finalised'))\n"  # would run at interpreter finalisation
              "d.init()\nprint('trained', end='')\nsys.stderr.write('note')\nd.leave(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "trained", "note"), proc


@pytest.mark.slow
def test_installed_wheel_ships_the_native_codec_source_and_builds_it(installed_wheel: Path, tmp_path: Path) -> None:
    probe = ("import os, shutil; from localsgd.engine import native_codec as n; "
             "print(n.SOURCE.is_file(), n._compiler() is not None and n.library() is not None, n.why_not)")
    env = {**clean_env(tmp_path), "LOCALSGD_CACHE_DIR": str(tmp_path / "cache")}
    proc = run([str(executable(installed_wheel, "python")), "-c", probe], tmp_path, env)
    assert proc.returncode == 0, report(proc)
    shipped, built = proc.stdout.split()[:2]
    assert shipped == "True", report(proc)
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        assert built == "True", report(proc)

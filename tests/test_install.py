"""A non-editable install runs the demo from anywhere: the wheel of the checkout, installed into a
folder of its own, runs `nlrw run tiny` (the built-in config, with the shipped tiny Pythia and
corpus) from an empty folder, without the checkout on the path."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from procs import ONE_DEVICE
from tiny_run import SMALL

REPO = Path(__file__).resolve().parents[1]

# Not copied into the build: the venvs, git, outputs and caches (ignored by git, and large).
NOT_BUILT = (".venv*", ".git", "runs", ".cache", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")

# The whole pipeline at its smallest (check_config's rules hold: calibration >= 2, no sizes to sweep);
# 2 latents to explain, score and simulate keep the LLM stages to a few minutes on 2 CPU cores.
RUN = [*SMALL, "explain.latents=2", "simulate.read_positions=8", "simulate.sentences=4", "simulate.calibration=4",
       "simulate.contexts_per_shard=4", "simulate.latents_per_shard=4", "calibrate.sizes=[]",
       "evaluate.fractions=[0.5,1.0]", "evaluate.batch_size=4", "evaluate.bootstrap=50"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder holding the installed wheel, environment that puts it first on the path)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy, so the build's build/ and egg-info never touch the checkout
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_BUILT))
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(tmp / "wheel"),
                    str(src)], check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = (tmp / "wheel").glob("nlrw_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in ("nlrw_jax/configs/tiny.yaml", "nlrw_jax/assets/tiny-pythia/final/model.safetensors",
                 "nlrw_jax/assets/tiny-pythia/final/config.json", "nlrw_jax/assets/tiny-pythia/checkpoints.json",
                 "nlrw_jax/assets/corpus/train.jsonl.xz", "nlrw_jax/assets/corpus/tokenizer.json"):
        assert need in names, f"{need} missing from {wheel.name}"
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=600)
    env = {**ONE_DEVICE, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    # SmolLM2 converted once for every test (a 0.5 GB cache, not part of what is installed)
    env.setdefault("NLRW_MODEL_CACHE", str(REPO / ".cache" / "models"))
    return site, env


def in_empty_folder(tmp_path, env, *args, timeout=1800):
    cwd = tmp_path / "empty"
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_installed_copy_is_the_one_imported(installed, tmp_path):
    site, env = installed
    r = in_empty_folder(tmp_path, env, "-c", "import nlrw_jax, nlrw_jax.config as c; print(nlrw_jax.__file__); "
                        "print(c.load_config('tiny').model.checkpoint)")
    assert r.returncode == 0, r.stderr
    module, checkpoint = r.stdout.split()
    assert Path(module).resolve().is_relative_to(site.resolve()), module
    assert not Path(module).resolve().is_relative_to(REPO), module
    # the built-in config's inputs resolve to the installed assets, next to it
    assert Path(checkpoint).resolve() == (site / "nlrw_jax" / "assets" / "tiny-pythia" / "final").resolve()


@pytest.mark.slow
def test_the_installed_copy_runs_the_demo_from_an_empty_folder(installed, tmp_path):
    _, env = installed
    r = in_empty_folder(tmp_path, env, "-m", "nlrw_jax.cli", "run", "tiny", *RUN)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    report = tmp_path / "empty" / "runs" / "tiny" / "report" / "report.md"
    assert report.is_file(), sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "empty").rglob("*"))[:50]

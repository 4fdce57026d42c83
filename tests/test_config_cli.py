"""Configs load typed, overrides apply, and bad input is a one-line error with exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from nlrw_jax.cli import main
from nlrw_jax.config import Config, load_config
from nlrw_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny-lm.yaml", "pythia-160m-l6.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, Config)


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["data.ctx_len=128", "pretrain.learning_rate=1", "model.revision=step1000",
                       "data.train=a.txt", "pretrain.export_fractions=[0.5]", "pretrain.arch.use_parallel_residual=false"])
    assert cfg.data.ctx_len == 128
    assert cfg.pretrain.learning_rate == 1.0 and isinstance(cfg.pretrain.learning_rate, float)
    assert cfg.model.revision == "step1000"
    assert cfg.data.train == ["a.txt"]
    assert cfg.pretrain.export_fractions == [0.5]
    assert cfg.pretrain.arch.use_parallel_residual is False


@pytest.mark.parametrize("override, message", [
    ("data.ctx_lne=128", "unknown config key data.ctx_lne"),
    ("bogus=1", "unknown config key bogus"),
    ("data.ctx_len=abc", "config key data.ctx_len expects int"),
    ("data.ctx_len=1.5", "config key data.ctx_len expects int"),
    ("pretrain.arch.use_parallel_residual=3", "pretrain.arch.use_parallel_residual expects bool"),
    ("model=3", "config key model must be a section"),
    ("noequals", "not of the form key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("data:\n  ctx_len: 64\n  shuffle_buffer: 3\n")
    with pytest.raises(UserError, match="unknown config key data.shuffle_buffer"):
        load_config(bad)


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "nlrw_jax.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_stages():
    out = run_cli("--help")
    assert out.returncode == 0
    for stage in ("run", "eval", "pretrain", "corpus"):
        assert stage in out.stdout


@pytest.mark.parametrize("args, message", [
    (["eval", "configs/tiny.yaml", "data.ctx_lne=5"], "unknown config key data.ctx_lne"),
    (["eval", "configs/tiny.yaml", "model.checkpoint=/no/such/folder"], "/no/such/folder does not exist"),
    (["eval", "configs/tiny.yaml", "data.ctx_len=512"], "longer than max_position_embeddings"),
    (["eval", "configs/tiny.yaml", "model.dtype=float8"], "model.dtype"),
    (["eval", "configs/missing.yaml"], "config file configs/missing.yaml does not exist"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message, tmp_path):
    out = run_cli(*args, f"run_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache")
    assert out.returncode == 2, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("nlrw: error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_cli_empty_corpus(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = run_cli("eval", "configs/tiny.yaml", f"data.validation={empty}", f"run_dir={tmp_path}",
                  f"data.cache_dir={tmp_path}/cache")
    assert out.returncode == 2 and "nlrw: error:" in out.stderr and "empty" in out.stderr.lower(), out.stderr


def test_main_returns_2_on_user_error(capsys):
    assert main(["eval", "configs/does-not-exist.yaml"]) == 2
    assert capsys.readouterr().err.count("\n") == 1

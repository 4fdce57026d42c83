#!/usr/bin/env python3
"""Run nlrw stages on a Cloud TPU pod slice: one process per TPU VM worker, all in step.

    python launch/tpu_pod.py all configs/pythia-160m-l6.yaml --run-dir gs://BUCKET/runs/p160 --dry-run

Subcommands (each takes --dry-run: print every command, shell-quoted, one per line; run nothing):
  create     reuse the slice if `describe` finds it, else create it
  install    copy this repo (a `git archive` of HEAD) to every worker, pip install it with jax[tpu]
  mount      gcsfuse the gs:// run folder on every worker at one path (--mount)
  run        `nlrw STAGE CONFIG run_dir=<mount> distributed.coordinator=auto ...` on --worker=all
  teardown   delete the slice
  all        create, install, mount, run each of --stages, then teardown if --teardown

Every command is built by a plain function returning an argv list (tested in tests/test_launch.py).
Stdlib only: it runs on a laptop with nothing but gcloud.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

# nlrw's stages (nlrw_jax/cli.py). With distributed.coordinator=auto every worker joins the
# cluster; capture / train / pretrain (and `run` up to training) work on every host, the other
# stages run on process 0 while the rest exit (nlrw_jax/distributed.py).
STAGES = ("run", "eval", "capture", "train", "pretrain", "examples", "explain", "score", "simulate",
          "calibrate", "evaluate", "report")

REMOTE_REPO = "~/nlrw_jax"  # on every worker, under the same user's home
REMOTE_VENV = "~/nlrw_venv"
ARCHIVE = "/tmp/nlrw_jax.tar.gz"
REPO = Path(__file__).resolve().parents[1]
# TPU VM images ship Python 3.10; the package needs >= 3.11, so uv fetches a managed one.
PYTHON = "3.12"

# Cloud Storage FUSE from Google's apt repository (TPU VM images do not have it).
GCSFUSE_INSTALL = (
    "command -v gcsfuse >/dev/null || { "
    "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt "
    "gcsfuse-$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
    "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc "
    ">/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }"
)


class UsageError(Exception):
    pass


def split_gs(url: str) -> tuple[str, str]:
    """gs://bucket/some/path -> (bucket, some/path)."""
    if not url.startswith("gs://"):
        raise UsageError(f"--run-dir {url!r} must be a gs:// URL (gs://BUCKET/PATH): every worker mounts it")
    bucket, _, path = url[len("gs://"):].partition("/")
    if not bucket:
        raise UsageError(f"--run-dir {url!r} names no bucket")
    return bucket, path.strip("/")


# ------------------------------------------------------------------------------ command builders


def _gcloud(a, *args) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={a.zone}"]
    return cmd + ([f"--project={a.project}"] if a.project else [])


def describe_cmd(a) -> list[str]:
    return _gcloud(a, "describe", a.name)


def create_cmd(a) -> list[str]:
    return _gcloud(a, "create", a.name, f"--accelerator-type={a.accelerator_type}", f"--version={a.version}")


def ssh_all(a, remote: str) -> list[str]:
    """`remote` (one shell string) on every worker at once: the pod's processes must start together."""
    return _gcloud(a, "ssh", a.name, "--worker=all", "--command", remote)


def install_cmds(a) -> list[list[str]]:
    setup = " && ".join([
        f"rm -rf {REMOTE_REPO} && mkdir -p {REMOTE_REPO} && tar -xzf ~/nlrw_jax.tar.gz -C {REMOTE_REPO}",
        "python3 -m pip install -q --user uv",
        f"~/.local/bin/uv venv -q --allow-existing --python {PYTHON} {REMOTE_VENV}",
        f"~/.local/bin/uv pip install -q --python {REMOTE_VENV}/bin/python -e {REMOTE_REPO} \"{a.jax}\"",
    ])
    return [
        ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={ARCHIVE}", a.ref],  # tracked files only
        _gcloud(a, "scp", ARCHIVE, f"{a.name}:nlrw_jax.tar.gz", "--worker=all"),  # into each worker's home
        ssh_all(a, setup),
    ]


def mount_cmd(a) -> list[str]:
    bucket, path = split_gs(a.run_dir)
    only = f"--only-dir={shlex.quote(path)} " if path else ""
    # TTL 0: hosts write files that the others must see at once (shard manifests, checkpoints).
    mnt = shlex.quote(a.mount)
    remote = (f"{GCSFUSE_INSTALL} && sudo mkdir -p {mnt} && sudo chown $USER {mnt} && "
              f"(mountpoint -q {mnt} || gcsfuse --implicit-dirs --metadata-cache-ttl-secs=0 {only}"
              f"{shlex.quote(bucket)} {mnt})")
    return ssh_all(a, remote)


def stage_cmd(a, stage: str) -> list[str]:
    if stage not in STAGES:
        raise UsageError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    # The token cache lives on the mount too: process 0 tokenizes, the other hosts read its cache.
    args = [stage, a.config, f"run_dir={a.mount}", f"data.cache_dir={a.mount}/token_cache",
            "distributed.coordinator=auto", *a.overrides]
    # cd first: the config's relative paths (configs/, assets/) resolve in the repo copy
    return ssh_all(a, f"cd {REMOTE_REPO} && {REMOTE_VENV}/bin/nlrw {shlex.join(args)}")


def delete_cmd(a) -> list[str]:
    return _gcloud(a, "delete", a.name, "--quiet")


# ---------------------------------------------------------------------------------- execution


def execute(cmd: list[str], dry_run: bool, probe: bool = False) -> int:
    """Print the command, then run it (unless dry_run). A failure stops everything, except for a
    probe, whose exit status is the answer (its output is not shown)."""
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    out = subprocess.DEVNULL if probe else None
    rc = subprocess.run(cmd, stdout=out, stderr=out).returncode
    if rc != 0 and not probe:
        raise SystemExit(f"tpu_pod: command failed (exit {rc}): {shlex.join(cmd)}")
    return rc


def do_create(a):
    # describe's exit status says whether the slice exists; a dry run cannot know, so it shows both
    if a.dry_run:
        execute(describe_cmd(a), True)
        print("# only if the describe above fails:")
        execute(create_cmd(a), True)
    elif execute(describe_cmd(a), False, probe=True) != 0:
        execute(create_cmd(a), False)
    else:
        print(f"# {a.name} exists: reusing it")


def do_install(a):
    for cmd in install_cmds(a):
        execute(cmd, a.dry_run)


def do_mount(a):
    execute(mount_cmd(a), a.dry_run)


def do_run(a):
    execute(stage_cmd(a, a.stage), a.dry_run)


def do_teardown(a):
    execute(delete_cmd(a), a.dry_run)


def do_all(a):
    stages = [s for s in a.stages.split(",") if s]
    for s in stages:
        stage_cmd(a, s)  # check every stage name before creating anything
    do_create(a)
    do_install(a)
    do_mount(a)
    for s in stages:
        execute(stage_cmd(a, s), a.dry_run)
    if a.teardown:
        do_teardown(a)


# ------------------------------------------------------------------------------------- parser


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like nlrw's own errors
        print(f"tpu_pod: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--name", default="nlrw", help="TPU slice name (default nlrw)")
    common.add_argument("--zone", default="us-central2-b", help="zone (default us-central2-b, where v4 lives)")
    common.add_argument("--project", default=None, help="GCP project (default: gcloud's configured one)")
    common.add_argument("--accelerator-type", default="v4-32", help="slice type (default v4-32: 4 hosts, 16 chips)")
    common.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime image (default tpu-ubuntu2204-base)")
    common.add_argument("--run-dir", default=None, help="gs://BUCKET/PATH: the run folder every worker shares")
    common.add_argument("--mount", default="/mnt/nlrw", help="where the run folder is mounted on every worker")
    common.add_argument("--ref", default="HEAD", help="git ref to install (default HEAD: commit your changes)")
    common.add_argument("--jax", default="jax[tpu]", help="the JAX requirement installed next to the package")
    common.add_argument("--dry-run", action="store_true", help="print every command, run nothing")

    parser = Parser(prog="tpu_pod", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True, parser_class=Parser)
    for name, fn, help_text in [("create", do_create, "create the slice, or reuse it"),
                                ("install", do_install, "copy the repo to every worker and pip install it"),
                                ("mount", do_mount, "gcsfuse the gs:// run folder on every worker"),
                                ("teardown", do_teardown, "delete the slice")]:
        sub.add_parser(name, parents=[common], help=help_text).set_defaults(fn=fn)
    p = sub.add_parser("run", parents=[common], help="run one nlrw stage on every worker")
    p.add_argument("stage", help=f"one of {', '.join(STAGES)}")
    p.add_argument("config", help="YAML config, relative to the repo (e.g. configs/pythia-160m-l6.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, after run_dir and distributed.coordinator")
    p.set_defaults(fn=do_run)
    p = sub.add_parser("all", parents=[common], help="create, install, mount, run --stages, [teardown]")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--stages", default="capture,train", help="comma-separated (default capture,train)")
    p.add_argument("--teardown", action="store_true", help="delete the slice at the end")
    p.set_defaults(fn=do_all)
    return parser


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        for o in getattr(a, "overrides", []):
            if "=" not in o:
                raise UsageError(f"override {o!r} is not of the form key=value")
        if a.cmd in ("mount", "run", "all"):
            if not a.run_dir:
                raise UsageError(f"{a.cmd} needs --run-dir gs://BUCKET/PATH")
            split_gs(a.run_dir)
        elif a.run_dir:
            split_gs(a.run_dir)
        if a.cmd == "run":
            stage_cmd(a, a.stage)
        a.fn(a)
    except UsageError as e:
        print(f"tpu_pod: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The GPU simulation pool: `nlrw simulate` over many GPUs, two ways (launch/README.md says which).

  slurm    a Slurm array, one offline vLLM engine per task (launch/slurm_simulate.sbatch), then a
           job that waits for the whole array (--dependency=afterok) and runs calibrate, evaluate,
           report (launch/slurm_finish.sbatch)
  servers  N vLLM OpenAI-compatible servers (one per GPU, here or on --hosts over ssh), or ones
           already running (--endpoints); one `nlrw simulate` (or --stages explain,score,simulate)
           drives them all (llm.backend=openai); --explainer-model with --explainer-gpus (or
           --explainer-endpoints) adds a second pool that explain and score use (the paper: a 70B
           explainer beside the 8B simulator)

    python launch/gpu_pool.py slurm configs/pythia-160m-l6.yaml --tasks 32 --dry-run
    python launch/gpu_pool.py servers configs/pythia-160m-l6.yaml --model M --gpus 0,1,2,3 --dry-run
    python launch/gpu_pool.py servers configs/pythia-160m-l6.yaml --stages explain,score,simulate \
        --model meta-llama/Llama-3.1-8B-Instruct --gpus 0,1 \
        --explainer-model hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4 --explainer-gpus 2,3 --dry-run

--dry-run prints every command, shell-quoted, one per line (steps that are not commands, such as
waiting for a server, as # comments), and runs nothing. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIMULATE_SBATCH = REPO / "launch" / "slurm_simulate.sbatch"
FINISH_SBATCH = REPO / "launch" / "slurm_finish.sbatch"
JOB = "${JOB}"  # in a dry run, the array's job id, captured by JOB=$(sbatch --parsable ...)


class UsageError(Exception):
    pass


def fail(message: str, code: int = 1):
    print(f"gpu_pool: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def show(cmd: list[str]) -> str:
    """Shell-quoted, except that ${JOB} stays expandable."""
    return " ".join(f'"{x}"' if JOB in x else shlex.quote(x) for x in cmd)


# ---------------------------------------------------------------------------------------- slurm


def slurm_cmds(a) -> tuple[list[str], list[str] | None]:
    """(the array submission, the dependent finish submission or None)."""
    common = [f"--chdir={REPO}"]  # the config's relative paths resolve in the repo
    common += [f"--partition={a.partition}"] if a.partition else []
    common += [f"--account={a.account}"] if a.account else []
    limit = f"%{a.max_running}" if a.max_running else ""
    array = ["sbatch", "--parsable", f"--array=0-{a.tasks - 1}{limit}", *common,
             *([f"--time={a.time}"] if a.time else []), str(SIMULATE_SBATCH), a.config, *a.overrides]
    if a.no_finish:
        return array, None
    # the same LLM config as the array's tasks: the predictions record it and calibrate checks it
    finish = ["sbatch", "--parsable", f"--dependency=afterok:{JOB}", *common, str(FINISH_SBATCH), a.config,
              "llm.backend=vllm", *a.overrides]
    return array, finish


def do_slurm(a):
    array, finish = slurm_cmds(a)
    if a.dry_run:
        print(f"JOB=$({show(array)})")
        if finish:
            print(show(finish))
        return 0
    print(show(array), flush=True)
    out = subprocess.run(array, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        fail(f"sbatch failed (exit {out.returncode})")
    job = out.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    print(f"# simulation array: job {job}")
    if finish:
        finish = [x.replace(JOB, job) for x in finish]
        print(show(finish), flush=True)
        rc = subprocess.run(finish).returncode
        if rc != 0:
            fail(f"sbatch of the finish job failed (exit {rc})")
    return 0


# -------------------------------------------------------------------------------------- servers


def server_plan(a, model: str, gpus: list[str], first_port: int) -> list[tuple[str, list[str]]]:
    """[(endpoint URL, argv that starts its server)]: one server per GPU, per host if --hosts."""
    plan = []
    for host in a.hosts or [None]:
        for i, gpu in enumerate(gpus):
            port = first_port + i
            server = ["env", f"CUDA_VISIBLE_DEVICES={gpu}", a.python, "-m", "vllm.entrypoints.openai.api_server",
                      "--model", model, "--host", "0.0.0.0" if host else "127.0.0.1", "--port", str(port),
                      "--enable-prefix-caching", "--max-logprobs", "20", *shlex.split(a.vllm_args)]
            if host:
                # -tt: when ssh is stopped, the remote side gets SIGHUP and the server goes with it
                server = ["ssh", "-tt", host, "exec " + shlex.join(server)]
            plan.append((f"http://{host or '127.0.0.1'}:{port}/v1", server))
    return plan


LLM_STAGES = ("explain", "score", "simulate")


def llm_overrides(a, key: str, model: str | None, endpoints: list[str]) -> list[str]:
    # max_concurrency is for the whole pool: keep every server's batch full. The model names the
    # tokenizer: prompts are rendered here.
    out = [f"{key}.backend=openai", f"{key}.endpoints=[{','.join(endpoints)}]",
           f"{key}.max_concurrency={a.concurrency_per_server * len(endpoints)}"]
    return out + ([f"{key}.model={model}"] if model else [])


def nlrw_cmds(a, endpoints: list[str], explainer: list[str]) -> list[list[str]]:
    """--stages (default simulate) against the endpoints, then (--finish) calibrate / evaluate / report.
    With an explainer pool, explain and score use it (their own LLM settings) and simulate the other."""
    # Set before the caller's overrides, which win.
    llm = llm_overrides(a, "llm", a.model, endpoints)
    if explainer:
        llm += [x for st in ("explain", "score") for x in llm_overrides(a, f"{st}.llm", a.explainer_model, explainer)]
    cmds = [[a.nlrw, stage, a.config, *llm, *a.overrides] for stage in a.stages]
    if a.finish:
        cmds += [[a.nlrw, stage, a.config, *llm, *a.overrides] for stage in ("calibrate", "evaluate", "report")]
    return cmds


def wait_for(url: str, deadline: float, procs: list) -> None:
    """Until GET url/models answers with a model list; a server that exits first is an error."""
    while True:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
                if json.load(r).get("data"):
                    return
        except Exception:
            pass
        for p, log in procs:
            if p.poll() is not None:
                fail(f"a server exited (status {p.returncode}) before answering; see {log}")
        if time.time() > deadline:
            fail(f"{url}/models did not answer within --wait-s; see the server logs")
        time.sleep(0.5)


def stop(procs: list) -> None:
    for p, _ in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)  # its own session: vLLM's engine process goes too
    for p, _ in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def do_servers(a):
    plan = [(u, None) for u in a.endpoints] if a.endpoints else server_plan(a, a.model, a.gpus, a.port)
    endpoints = [u for u, _ in plan]
    # The explainer pool (a second model, e.g. the 70B explainer beside the 8B simulator): its own
    # GPUs and ports after the simulator's.
    extra = [(u, None) for u in a.explainer_endpoints] if a.explainer_endpoints else \
        server_plan(a, a.explainer_model, a.explainer_gpus, a.port + len(a.gpus)) if a.explainer_gpus else []
    cmds = nlrw_cmds(a, endpoints, [u for u, _ in extra])
    plan += extra
    if a.dry_run:
        for _, server in plan:
            if server:
                print(show(server) + " &")
        for u in endpoints:
            print(f"# wait until {u}/models answers")
        for i, cmd in enumerate(cmds + [None]):
            if i == len(a.stages) and not a.endpoints and not a.keep:
                print(f"# stop the {len(plan)} server{'s' if len(plan) > 1 else ''} started above")
            if cmd:
                print(show(cmd))
        return 0
    procs = []
    log_dir = Path(a.log_dir)
    try:
        for i, (_, server) in enumerate(plan):
            if server is None:
                continue
            log_dir.mkdir(parents=True, exist_ok=True)
            log = log_dir / f"server{i}.log"
            print(show(server) + f" >{log} 2>&1 &", flush=True)
            with open(log, "ab") as f:
                procs.append((subprocess.Popen(server, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True), log))
        deadline = time.time() + a.wait_s
        for u in endpoints:
            print(f"# waiting for {u}/models", flush=True)
            wait_for(u, deadline, procs)
        for i, cmd in enumerate(cmds):
            if i == len(a.stages) and not a.keep:
                stop(procs)  # the LLM stages are done: free the GPUs for evaluate's forward
                procs = []
            print(show(cmd), flush=True)
            rc = subprocess.run(cmd).returncode
            if rc != 0:
                return rc  # nlrw has printed its one-line error
    finally:
        if not a.keep:
            stop(procs)
    return 0


# --------------------------------------------------------------------------------------- parser


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        fail(message, 2)


def _list(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def build_parser() -> Parser:
    parser = Parser(prog="gpu_pool", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True, parser_class=Parser)

    p = sub.add_parser("slurm", help="a Slurm array of offline vLLM engines, then calibrate/evaluate/report")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, passed to every task (e.g. llm.model=...)")
    p.add_argument("--tasks", type=int, required=True, help="array tasks = shards workers = GPUs")
    p.add_argument("--max-running", type=int, default=0, help="at most this many tasks at once (%%M)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default=None, help="per task, overrides the script's 24:00:00")
    p.add_argument("--no-finish", action="store_true", help="submit the array only")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    p.set_defaults(fn=do_slurm)

    p = sub.add_parser("servers", help="N vLLM OpenAI-compatible servers behind llm.backend=openai")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, after the llm.* ones this sets")
    p.add_argument("--model", default=None, help="HF name or folder the servers load; also llm.model (tokenizer)")
    p.add_argument("--gpus", type=_list, default=[], help="comma-separated GPU ids: one server each")
    p.add_argument("--hosts", type=_list, default=[], help="start the servers on these hosts over ssh "
                                                            "(each with every --gpus)")
    p.add_argument("--endpoints", type=_list, default=[], help="servers already running: base URLs "
                                                                "(http://host:port/v1), started by someone else")
    p.add_argument("--port", type=int, default=8000, help="first port; the i-th GPU's server gets port + i")
    p.add_argument("--explainer-model", default=None,
                   help="a second pool for explain and score (their <stage>.llm settings), e.g. the 70B explainer")
    p.add_argument("--explainer-gpus", type=_list, default=[], help="its GPUs (ports follow the simulator's)")
    p.add_argument("--explainer-endpoints", type=_list, default=[], help="or its servers already running")
    p.add_argument("--python", default="python", help="the Python with vLLM (on every host)")
    p.add_argument("--vllm-args", default="", help="more server flags, one string (e.g. '--max-model-len 4096')")
    p.add_argument("--concurrency-per-server", type=int, default=128, help="requests in flight per server")
    p.add_argument("--stages", type=_list, default=["simulate"],
                   help=f"the LLM stages to drive, in order, from {','.join(LLM_STAGES)} (default simulate)")
    p.add_argument("--nlrw", default="nlrw", help="the nlrw command of the driver")
    p.add_argument("--finish", action="store_true", help="then calibrate, evaluate, report (servers stopped first)")
    p.add_argument("--wait-s", type=float, default=1800, help="how long servers may take to load (default 1800)")
    p.add_argument("--log-dir", default=".cache/vllm-servers", help="server logs")
    p.add_argument("--keep", action="store_true", help="leave the started servers running")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    p.set_defaults(fn=do_servers)
    return parser


def check(a) -> None:
    for o in a.overrides:
        if "=" not in o:
            raise UsageError(f"override {o!r} is not of the form key=value")
    if a.cmd == "slurm":
        if a.tasks < 1:
            raise UsageError(f"--tasks {a.tasks}: need at least 1")
        return
    if bool(a.endpoints) == bool(a.gpus):
        raise UsageError("servers needs --gpus (start one server per GPU) or --endpoints (use running ones), "
                         "not both")
    if a.gpus and not a.model:
        raise UsageError("starting servers needs --model (an HF name or a folder every host can read)")
    if a.explainer_gpus and a.explainer_endpoints:
        raise UsageError("the explainer pool takes --explainer-gpus or --explainer-endpoints, not both")
    if (a.explainer_gpus or a.explainer_endpoints) and not a.explainer_model:
        raise UsageError("an explainer pool needs --explainer-model (its tokenizer renders the prompts)")
    if set(a.gpus) & set(a.explainer_gpus):
        raise UsageError(f"GPUs {sorted(set(a.gpus) & set(a.explainer_gpus))} are in both pools: one server per GPU")
    for u in a.endpoints + a.explainer_endpoints:
        if not u.startswith(("http://", "https://")):
            raise UsageError(f"--endpoints {u!r} is not an http(s):// base URL like http://host:8000/v1")
    bad = [st for st in a.stages if st not in LLM_STAGES]
    if bad or not a.stages:
        raise UsageError(f"--stages {','.join(a.stages)}: choose from {', '.join(LLM_STAGES)}")
    if a.concurrency_per_server < 1 or a.wait_s <= 0:
        raise UsageError("--concurrency-per-server and --wait-s must be positive")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        check(a)
    except UsageError as e:
        fail(str(e), 2)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())

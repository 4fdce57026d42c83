"""launch/: the TPU pod and GPU pool helpers' dry runs, their argument errors, and the sbatch scripts.

Nothing here reaches a real gcloud, sbatch, ssh or vLLM. Dry runs are run with FAKE commands first
on PATH that record any call, and each test asserts that none was called. Where a test does
execute (the sbatch scripts, a submission, a server pool), the commands it reaches are FAKES that
record their argv.
"""

import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU_POD = REPO / "launch" / "tpu_pod.py"
GPU_POOL = REPO / "launch" / "gpu_pool.py"
SIM_SBATCH = REPO / "launch" / "slurm_simulate.sbatch"
FINISH_SBATCH = REPO / "launch" / "slurm_finish.sbatch"
SEP = "\x1f"  # between the recorded argv items of one call

CFG = "configs/pythia-160m-l6.yaml"
POD = ["--name", "pod1", "--zone", "us-central2-b", "--run-dir", "gs://my-bucket/runs/p160"]


def _fake(bin_dir: Path, name: str, body: str) -> Path:
    path = bin_dir / name
    path.write_text(body)
    path.chmod(0o755)
    return path


def _recorder(name: str, stdout: str = "", rc: str = "0") -> str:
    """A FAKE command: appends `name<SEP>arg1<SEP>arg2...` to $FAKE_LOG, prints stdout, exits rc."""
    return ("#!/bin/bash\n# FAKE " + name + ": records its argv instead of doing anything\n"
            f"printf '%s' {shlex.quote(name)} >> \"$FAKE_LOG\"\n"
            "for a in \"$@\"; do printf '\\x1f%s' \"$a\" >> \"$FAKE_LOG\"; done\n"
            "printf '\\n' >> \"$FAKE_LOG\"\n"
            f"printf '%s' {shlex.quote(stdout)}\n"
            f"exit {rc}\n")


def calls(log: Path) -> list[list[str]]:
    return [line.split(SEP) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def env(tmp_path):
    """PATH with FAKES first: every external command the launchers could call records its call
    in $FAKE_LOG and fails. A dry run must leave the log empty."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "sbatch", "ssh", "git", "nlrw", "gcsfuse", "curl", "vllm"):
        _fake(bin_dir, name, _recorder(name, rc="97"))
    e = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "fake.log"))
    e.pop("SLURM_ARRAY_TASK_ID", None)
    e.pop("SLURM_ARRAY_TASK_COUNT", None)
    e.pop("SLURM_ARRAY_TASK_MIN", None)
    return e


def run(script: Path, args, env, cwd=None):
    return subprocess.run([sys.executable, str(script), *args], env=env, cwd=cwd or env["FAKE_LOG"].rsplit("/", 1)[0],
                          capture_output=True, text=True, timeout=60)


def commands(stdout: str) -> list[list[str]]:
    """The printed commands as argv lists (comment lines are not commands)."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def remote(cmd: list[str]) -> str:
    """The shell string a `gcloud ... ssh --command STRING` runs on the workers."""
    return cmd[cmd.index("--command") + 1]


# ------------------------------------------------------------------------------------ tpu_pod


def test_tpu_pod_all_dry_run_prints_every_step_in_order(env):
    r = run(TPU_POD, ["all", CFG, "sparse.steps=10", *POD, "--accelerator-type", "v4-64", "--version", "rt-1",
                      "--stages", "capture,train", "--teardown", "--dry-run"], env)
    assert r.returncode == 0, r.stderr
    assert not Path(env["FAKE_LOG"]).exists(), "a dry run called a command"
    cmds = commands(r.stdout)
    gcloud_tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert [c[:5] for c in cmds] == [gcloud_tpu + ["describe"], gcloud_tpu + ["create"],
                                     ["git", "-C", str(REPO), "archive", "--format=tar.gz"],
                                     gcloud_tpu + ["scp"], gcloud_tpu + ["ssh"], gcloud_tpu + ["ssh"],
                                     gcloud_tpu + ["ssh"], gcloud_tpu + ["ssh"], gcloud_tpu + ["delete"]]
    describe, create, archive, scp, install, mount, capture, train, delete = cmds
    assert "# only if the describe above fails:" in r.stdout.splitlines()
    for c in (describe, create, scp, install, mount, capture, train, delete):
        assert "--zone=us-central2-b" in c
        assert "pod1" in c or "pod1:nlrw_jax.tar.gz" in c
    assert {"--accelerator-type=v4-64", "--version=rt-1"} <= set(create)
    assert archive[-1] == "HEAD" and "--output=/tmp/nlrw_jax.tar.gz" in archive
    assert scp[5:7] == ["/tmp/nlrw_jax.tar.gz", "pod1:nlrw_jax.tar.gz"]
    for c in (scp, install, mount, capture, train):
        assert "--worker=all" in c
    assert '-e ~/nlrw_jax "jax[tpu]"' in remote(install)
    assert "gcsfuse --implicit-dirs --metadata-cache-ttl-secs=0 --only-dir=runs/p160 my-bucket /mnt/nlrw" \
        in remote(mount)
    for stage, c in (("capture", capture), ("train", train)):
        assert remote(c) == (f"cd ~/nlrw_jax && ~/nlrw_venv/bin/nlrw {stage} {CFG} run_dir=/mnt/nlrw "
                             f"data.cache_dir=/mnt/nlrw/token_cache distributed.coordinator=auto sparse.steps=10")
    assert "--quiet" in delete


def test_tpu_pod_subcommands_compose_all(env):
    """`all` prints exactly what the subcommands print one after the other."""
    def out(*args):
        r = run(TPU_POD, [*args, *POD, "--dry-run"], env)
        assert r.returncode == 0, r.stderr
        return r.stdout

    parts = (out("create") + out("install") + out("mount") + out("run", "capture", CFG, "a.b=1")
             + out("run", "train", CFG, "a.b=1") + out("teardown"))
    assert out("all", CFG, "a.b=1", "--teardown") == parts
    assert "delete" not in out("all", CFG)  # teardown only when asked
    assert not Path(env["FAKE_LOG"]).exists()


def test_tpu_pod_run_quotes_overrides_and_takes_any_stage(env):
    r = run(TPU_POD, ["run", "examples", CFG, "llm.endpoints=[http://a:8000/v1]", "x.y=two words", *POD,
                      "--mount", "/mnt/r", "--project", "proj", "--dry-run"], env)
    assert r.returncode == 0, r.stderr
    (cmd,) = commands(r.stdout)
    assert "--project=proj" in cmd and "--worker=all" in cmd
    assert shlex.split(remote(cmd))[3:] == ["~/nlrw_venv/bin/nlrw", "examples", CFG, "run_dir=/mnt/r",
                                            "data.cache_dir=/mnt/r/token_cache", "distributed.coordinator=auto", "llm.endpoints=[http://a:8000/v1]",
                                            "x.y=two words"]


@pytest.mark.parametrize("describe_rc, expect_create", [(0, False), (1, True)])
def test_tpu_pod_create_reuses_an_existing_slice(env, describe_rc, expect_create):
    # a FAKE gcloud whose `describe` exits describe_rc (0: the slice exists)
    bin_dir = Path(env["PATH"].split(":")[0])
    _fake(bin_dir, "gcloud", _recorder("gcloud", rc=f"$([ \"$4\" = describe ] && echo {describe_rc} || echo 0)"))
    r = run(TPU_POD, ["create", *POD], env)
    assert r.returncode == 0, r.stderr
    verbs = [c[4] for c in calls(Path(env["FAKE_LOG"]))]
    assert verbs == (["describe", "create"] if expect_create else ["describe"])


@pytest.mark.parametrize("args, message", [
    (["mount", "--run-dir", "/local/path", "--dry-run"], "must be a gs:// URL"),
    (["mount", "--run-dir", "gs://", "--dry-run"], "names no bucket"),
    (["mount", "--dry-run"], "mount needs --run-dir"),
    (["run", "capture", CFG, "--dry-run"], "run needs --run-dir"),
    (["run", "captur", CFG, "--run-dir", "gs://b/r", "--dry-run"], "unknown stage 'captur'"),
    (["all", CFG, "--stages", "capture,trian", "--run-dir", "gs://b/r", "--dry-run"], "unknown stage 'trian'"),
    (["run", "train", CFG, "notakeyvalue", "--run-dir", "gs://b/r", "--dry-run"], "is not of the form key=value"),
    (["create", "--bogus", "--dry-run"], "unrecognized arguments: --bogus"),
    (["launch"], "invalid choice: 'launch'"),
    ([], "the following arguments are required"),
])
def test_tpu_pod_bad_input_is_one_line_exit_2(env, args, message):
    r = run(TPU_POD, args, env)
    assert r.returncode == 2
    assert r.stdout == ""  # nothing printed, so nothing half-done
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpu_pod: error: ") and message in lines[0], r.stderr
    assert not Path(env["FAKE_LOG"]).exists()


def test_tpu_pod_builders_return_argv_lists():
    spec = importlib.util.spec_from_file_location("tpu_pod", TPU_POD)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = mod.build_parser().parse_args(["run", "train", CFG, *POD])
    assert mod.split_gs("gs://b/x/y/") == ("b", "x/y") and mod.split_gs("gs://b") == ("b", "")
    cmd = mod.stage_cmd(a, "train")
    assert isinstance(cmd, list) and all(isinstance(x, str) for x in cmd)
    assert cmd[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--worker=all"]
    assert mod.delete_cmd(a)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod1"]


# ------------------------------------------------------------------------------ gpu_pool slurm


def test_gpu_pool_slurm_dry_run(env):
    r = run(GPU_POOL, ["slurm", CFG, "llm.model=M", "simulate.sentences=1000", "--tasks", "32",
                       "--max-running", "8", "--partition", "gpu", "--dry-run"], env)
    assert r.returncode == 0, r.stderr
    assert not Path(env["FAKE_LOG"]).exists()
    first, second = r.stdout.splitlines()
    assert first.startswith("JOB=$(") and first.endswith(")")
    array = shlex.split(first[len("JOB=$("):-1])
    assert array == ["sbatch", "--parsable", "--array=0-31%8", f"--chdir={REPO}", "--partition=gpu",
                     str(SIM_SBATCH), CFG, "llm.model=M", "simulate.sentences=1000"]
    finish = shlex.split(second)
    assert finish == ["sbatch", "--parsable", "--dependency=afterok:${JOB}", f"--chdir={REPO}", "--partition=gpu",
                      str(FINISH_SBATCH), CFG, "llm.backend=vllm", "llm.model=M", "simulate.sentences=1000"]


def test_gpu_pool_slurm_dry_run_output_is_a_working_script(env, tmp_path):
    """Pasted into bash, the dry run submits the array, then the finish job depending on its id.
    The sbatch reached here is a FAKE that records its argv and answers job id 4242."""
    r = run(GPU_POOL, ["slurm", CFG, "--tasks", "4", "--dry-run"], env)
    bin_dir = Path(env["PATH"].split(":")[0])
    _fake(bin_dir, "sbatch", _recorder("sbatch", stdout="4242"))
    subprocess.run(["bash", "-euc", r.stdout], env=env, check=True, timeout=30)
    (array, finish) = calls(Path(env["FAKE_LOG"]))
    assert "--array=0-3" in array and "--dependency=afterok:4242" in finish


def test_gpu_pool_slurm_submits_array_then_dependent_finish(env):
    # a FAKE sbatch that answers like `sbatch --parsable` on a federated cluster: "id;cluster"
    bin_dir = Path(env["PATH"].split(":")[0])
    _fake(bin_dir, "sbatch", _recorder("sbatch", stdout="777;clusterA"))
    r = run(GPU_POOL, ["slurm", CFG, "k=v", "--tasks", "2"], env)
    assert r.returncode == 0, r.stderr
    array, finish = calls(Path(env["FAKE_LOG"]))
    assert array[1:] == ["--parsable", "--array=0-1", f"--chdir={REPO}", str(SIM_SBATCH), CFG, "k=v"]
    assert finish[1:] == ["--parsable", "--dependency=afterok:777", f"--chdir={REPO}", str(FINISH_SBATCH), CFG,
                          "llm.backend=vllm", "k=v"]


# ---------------------------------------------------------------------------- gpu_pool servers


def test_gpu_pool_servers_dry_run_local_gpus(env):
    r = run(GPU_POOL, ["servers", CFG, "llm.dtype=bfloat16", "--model", "meta/Llama", "--gpus", "0,1",
                       "--port", "9000", "--python", "/venv/bin/python", "--vllm-args", "--max-model-len 4096",
                       "--dry-run"], env)
    assert r.returncode == 0, r.stderr
    assert not Path(env["FAKE_LOG"]).exists()
    lines = r.stdout.splitlines()
    servers = [shlex.split(x[:-2]) for x in lines if x.endswith(" &")]
    for gpu, cmd in enumerate(servers):
        assert cmd == ["env", f"CUDA_VISIBLE_DEVICES={gpu}", "/venv/bin/python", "-m",
                       "vllm.entrypoints.openai.api_server", "--model", "meta/Llama", "--host", "127.0.0.1",
                       "--port", str(9000 + gpu), "--enable-prefix-caching", "--max-logprobs", "20",
                       "--max-model-len", "4096"]
    assert len(servers) == 2
    urls = ["http://127.0.0.1:9000/v1", "http://127.0.0.1:9001/v1"]
    assert lines[2:4] == [f"# wait until {u}/models answers" for u in urls]
    assert shlex.split(lines[4]) == ["nlrw", "simulate", CFG, "llm.backend=openai", f"llm.endpoints=[{','.join(urls)}]",
                                     "llm.max_concurrency=256", "llm.model=meta/Llama", "llm.dtype=bfloat16"]
    assert lines[5:] == ["# stop the 2 servers started above"]


def test_gpu_pool_servers_dry_run_hosts_and_finish(env):
    r = run(GPU_POOL, ["servers", CFG, "--model", "M", "--hosts", "n1,n2", "--gpus", "3", "--finish",
                       "--stages", "explain,score,simulate", "--concurrency-per-server", "10", "--dry-run"], env)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    for host, cmd in zip(("n1", "n2"), cmds[:2]):
        assert cmd[:3] == ["ssh", "-tt", host] and cmd[-1] == "&"
        assert shlex.split(cmd[3])[:4] == ["exec", "env", "CUDA_VISIBLE_DEVICES=3", "python"]
        assert "--host 0.0.0.0 --port 8000" in cmd[3]
    stages = [c[1] for c in cmds[2:]]
    assert stages == ["explain", "score", "simulate", "calibrate", "evaluate", "report"]
    for c in cmds[2:]:
        assert c[3:6] == ["llm.backend=openai", "llm.endpoints=[http://n1:8000/v1,http://n2:8000/v1]",
                          "llm.max_concurrency=20"]
    lines = r.stdout.splitlines()
    # the servers go once the LLM stages are done, before evaluate needs the GPUs
    assert lines.index("# stop the 2 servers started above") == lines.index(shlex.join(cmds[4])) + 1


def test_gpu_pool_servers_dry_run_existing_endpoints(env):
    r = run(GPU_POOL, ["servers", CFG, "--endpoints", "http://a:1/v1,https://b/v1", "--nlrw", "/v/nlrw",
                       "--dry-run"], env)
    assert r.returncode == 0, r.stderr
    assert commands(r.stdout) == [["/v/nlrw", "simulate", CFG, "llm.backend=openai",
                                   "llm.endpoints=[http://a:1/v1,https://b/v1]", "llm.max_concurrency=256"]]
    assert "stop" not in r.stdout  # servers it did not start, it leaves alone


FAKE_SERVER = """#!{python}
# FAKE vLLM OpenAI server: answers GET /v1/models as vLLM does; records its argv, GPU and pid.
import http.server, json, os, sys, time
args = sys.argv[1:]
port, model = int(args[args.index("--port") + 1]), args[args.index("--model") + 1]
with open(os.environ["FAKE_LOG"] + ".server" + str(port), "w") as f:
    json.dump(dict(argv=args, gpu=os.environ.get("CUDA_VISIBLE_DEVICES"), pid=os.getpid()), f)
time.sleep(0.3)  # a server that takes a moment to come up

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/v1/models"
        body = json.dumps(dict(data=[dict(id=model)]) if ok else {{}}).encode()
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _two_free_ports() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def test_gpu_pool_servers_starts_waits_drives_and_stops(env, tmp_path):
    """The real path with FAKES: fake vLLM servers on two 'GPUs', a fake nlrw that records its argv."""
    bin_dir = Path(env["PATH"].split(":")[0])
    fake_python = _fake(tmp_path, "fake_vllm_python", FAKE_SERVER.format(python=sys.executable))
    _fake(bin_dir, "nlrw", _recorder("nlrw"))
    port = _two_free_ports()
    r = run(GPU_POOL, ["servers", CFG, "k=v", "--model", "M", "--gpus", "0,1", "--port", str(port),
                       "--python", str(fake_python), "--log-dir", str(tmp_path / "logs"), "--wait-s", "30"], env)
    assert r.returncode == 0, r.stderr
    urls = [f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port + 1}/v1"]
    assert calls(Path(env["FAKE_LOG"])) == [["nlrw", "simulate", CFG, "llm.backend=openai",
                                             f"llm.endpoints=[{','.join(urls)}]", "llm.max_concurrency=256",
                                             "llm.model=M", "k=v"]]
    for gpu in (0, 1):
        rec = json.loads(Path(f"{env['FAKE_LOG']}.server{port + gpu}").read_text())
        assert rec["gpu"] == str(gpu) and rec["argv"][:2] == ["-m", "vllm.entrypoints.openai.api_server"]
        with pytest.raises(ProcessLookupError):  # stopped when the simulation was done
            os.kill(rec["pid"], 0)


def test_gpu_pool_servers_dead_server_is_an_error(env, tmp_path):
    dead = _fake(tmp_path, "dead_python", "#!/bin/bash\n# FAKE server that dies at once\nexit 3\n")
    r = run(GPU_POOL, ["servers", CFG, "--model", "M", "--gpus", "0", "--port", str(_two_free_ports()),
                       "--python", str(dead), "--log-dir", str(tmp_path / "logs")], env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("gpu_pool: error: a server exited (status 3)")
    assert not Path(env["FAKE_LOG"]).exists()  # nlrw never ran


@pytest.mark.parametrize("args, message", [
    (["slurm", CFG, "--dry-run"], "the following arguments are required: --tasks"),
    (["slurm", CFG, "--tasks", "0", "--dry-run"], "--tasks 0: need at least 1"),
    (["slurm", CFG, "--tasks", "two", "--dry-run"], "invalid int value: 'two'"),
    (["slurm", CFG, "oops", "--tasks", "2", "--dry-run"], "is not of the form key=value"),
    (["servers", CFG, "--dry-run"], "needs --gpus"),
    (["servers", CFG, "--gpus", "0", "--endpoints", "http://a/v1", "--model", "M", "--dry-run"], "not both"),
    (["servers", CFG, "--gpus", "0", "--dry-run"], "needs --model"),
    (["servers", CFG, "--endpoints", "a:8000", "--dry-run"], "is not an http(s):// base URL"),
    (["servers", CFG, "--endpoints", "http://a/v1", "--concurrency-per-server", "0", "--dry-run"], "must be positive"),
    (["servers", CFG, "--endpoints", "http://a/v1", "--stages", "simulate,report", "--dry-run"],
     "--stages simulate,report: choose from explain, score, simulate"),
    (["pool"], "invalid choice: 'pool'"),
])
def test_gpu_pool_bad_input_is_one_line_exit_2(env, args, message):
    r = run(GPU_POOL, args, env)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_pool: error: ") and message in lines[0], r.stderr
    assert not Path(env["FAKE_LOG"]).exists()


# -------------------------------------------------------------------------------- sbatch scripts


def test_sbatch_scripts_parse_and_ask_for_one_gpu():
    for script in (SIM_SBATCH, FINISH_SBATCH):
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        assert "#SBATCH --gres=gpu:1" in text and "#SBATCH --ntasks=1" in text
    assert "#SBATCH --array=" in SIM_SBATCH.read_text()


def test_slurm_simulate_runs_the_shard_of_its_array_task(env, tmp_path):
    """The script as a Slurm array task would run it; the nlrw it reaches is a FAKE that records its
    argv and the JAX platform it was given."""
    bin_dir = Path(env["PATH"].split(":")[0])
    _fake(bin_dir, "nlrw", _recorder("nlrw").replace("exit 0", 'echo "JAX_PLATFORMS=$JAX_PLATFORMS" >> "$FAKE_LOG.env"'))
    e = dict(env, SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_COUNT="8")
    e.pop("JAX_PLATFORMS", None)
    args = [CFG, "llm.model=meta-llama/Llama-3.1-8B-Instruct", "a.b=[1, 2]"]
    subprocess.run(["bash", str(SIM_SBATCH), *args], env=e, cwd=tmp_path, check=True, timeout=30)
    assert calls(Path(env["FAKE_LOG"])) == [["nlrw", "simulate", CFG, "--shard", "3", "--num-shards", "8",
                                             "llm.backend=vllm", *args[1:]]]
    assert Path(env["FAKE_LOG"] + ".env").read_text() == "JAX_PLATFORMS=cpu\n"  # vLLM keeps the GPU
    # an array numbered from 1 (--array=1-8): task 1 is shard 0
    Path(env["FAKE_LOG"]).unlink()
    e.update(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_MIN="1", NLRW=str(bin_dir / "nlrw"))
    subprocess.run(["bash", str(SIM_SBATCH), CFG], env=e, cwd=tmp_path, check=True, timeout=30)
    assert calls(Path(env["FAKE_LOG"])) == [["nlrw", "simulate", CFG, "--shard", "0", "--num-shards", "8",
                                             "llm.backend=vllm"]]


@pytest.mark.parametrize("slurm_env, args, message", [
    ({}, [CFG], "not an array task"),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}, [], "usage: sbatch"),
])
def test_slurm_simulate_bad_use_is_one_line_exit_2(env, tmp_path, slurm_env, args, message):
    r = subprocess.run(["bash", str(SIM_SBATCH), *args], env=dict(env, **slurm_env), cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slurm_simulate: error: ") and message in lines[0]
    assert not Path(env["FAKE_LOG"]).exists()


def test_slurm_finish_runs_calibrate_evaluate_report(env, tmp_path):
    bin_dir = Path(env["PATH"].split(":")[0])
    _fake(bin_dir, "nlrw", _recorder("nlrw"))  # FAKE nlrw: records each stage's argv
    subprocess.run(["bash", str(FINISH_SBATCH), CFG, "llm.backend=vllm", "k=v"], env=env, cwd=tmp_path,
                   check=True, timeout=30)
    assert calls(Path(env["FAKE_LOG"])) == [["nlrw", s, CFG, "llm.backend=vllm", "k=v"]
                                            for s in ("calibrate", "evaluate", "report")]


def test_gpu_pool_servers_two_pools_dry_run(env):
    """The paper's two LLMs: the simulator's servers and the explainer's, explain and score pointed at
    the explainer's through their own LLM settings; bad pools are one line, exit 2."""
    r = run(GPU_POOL, ["servers", CFG, "--model", "S", "--gpus", "0,1", "--explainer-model", "E", "--explainer-gpus",
                       "2", "--port", "9000", "--stages", "explain,score,simulate", "--dry-run"], env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    servers = [shlex.split(x[:-2]) for x in lines if x.endswith(" &")]
    assert [(c[1], c[c.index("--model") + 1], c[c.index("--port") + 1]) for c in servers] == [
        ("CUDA_VISIBLE_DEVICES=0", "S", "9000"), ("CUDA_VISIBLE_DEVICES=1", "S", "9001"),
        ("CUDA_VISIBLE_DEVICES=2", "E", "9002")]
    explain = shlex.split(next(x for x in lines if x.startswith("nlrw explain")))
    assert "explain.llm.endpoints=[http://127.0.0.1:9002/v1]" in explain and "explain.llm.model=E" in explain
    assert "score.llm.endpoints=[http://127.0.0.1:9002/v1]" in explain and "llm.model=S" in explain
    assert "llm.endpoints=[http://127.0.0.1:9000/v1,http://127.0.0.1:9001/v1]" in explain
    from nlrw_jax.config import load_config, stage_llm  # the overrides load, each stage with its pool
    cfg = load_config(CFG, [x for x in explain[3:]])
    assert stage_llm(cfg, "explain").endpoints == ["http://127.0.0.1:9002/v1"]
    assert stage_llm(cfg, "simulate").endpoints == ["http://127.0.0.1:9000/v1", "http://127.0.0.1:9001/v1"]
    for args, msg in [(["--explainer-gpus", "1"], "GPUs ['1'] are in both pools"),
                      (["--explainer-gpus", "2", "--explainer-model", ""], "needs --explainer-model")]:
        r = run(GPU_POOL, ["servers", CFG, "--model", "S", "--gpus", "0,1", "--explainer-model", "E", *args,
                           "--dry-run"], env)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

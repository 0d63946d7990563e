"""Running Pare on clusters: the container's install set against uv.lock (docker/), the Slurm
launch logic (slurm/common.sh, with stand-in srun/scontrol that record what they are given), and
the GPU each task picks (pare_nemo.parallel)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pare_nemo.parallel import cuda_device, free_port

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "docker" / "requirements.txt"
# What the NGC container provides: torch and, with it, what only torch needs (docker/requirements.sh
# prunes them: triton, nvidia-*, cuda-*, sympy, mpmath, setuptools).
CONTAINER_PROVIDED = {"torch"}


PURE_PYTHON_NVIDIA = ("nvidia-modelopt", "nvidia-ml-py")  # ModelOpt (pare quantize), NVML bindings


def cuda_stack(name: str) -> bool:
    return name not in PURE_PYTHON_NVIDIA and (
        name in ("torch", "triton") or name.startswith(("nvidia-", "cuda-")))


# the NGC images' platforms (x86_64 and arm64 builds), Python 3.12
ENVIRONMENTS = [default_environment() | {
    "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
    "platform_machine": machine, "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "python_version": "3.12",
    "python_full_version": "3.12.3"} for machine in ("x86_64", "aarch64")]


def locked() -> dict[str, dict]:
    return {p["name"]: p for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}


def install_set() -> list[Requirement]:
    lines = REQUIREMENTS.read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def runtime_closure(env: dict, provided=CONTAINER_PROVIDED) -> set[str]:
    """Every package Pare needs at run time on ``env`` by uv.lock's graph, less the ``provided``
    packages and what is reached only through them."""
    pkgs = locked()
    todo, seen = list(pkgs["pare"]["dependencies"]), set()
    while todo:
        dep = todo.pop()
        if dep["name"] in provided or (
                "marker" in dep and not Marker(dep["marker"]).evaluate(env)):
            continue
        pkg = pkgs[dep["name"]]
        for extra in [None, *dep.get("extra", [])]:
            if (dep["name"], extra) not in seen:
                seen.add((dep["name"], extra))
                todo += pkg.get("dependencies", []) if extra is None \
                    else pkg["optional-dependencies"][extra]
    return {name for name, _ in seen}


def test_install_set_is_pinned_at_the_locked_versions():
    pkgs = locked()
    reqs = install_set()
    names = [canonicalize_name(r.name) for r in reqs]
    assert len(names) == len(set(names)) > 100
    for r in reqs:
        assert not r.extras and not r.url, r
        assert str(r.specifier) == f"=={pkgs[canonicalize_name(r.name)]['version']}", r
    assert not [n for n in names if cuda_stack(n)], "torch / CUDA packages are the container's"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda e: e["platform_machine"])
def test_install_set_is_the_locked_runtime_closure(env):
    """Exactly what uv.lock says Pare needs, less torch and what only torch needs: nothing
    missing (pip --no-deps would not notice), nothing extra."""
    wanted = {canonicalize_name(r.name) for r in install_set()
              if r.marker is None or r.marker.evaluate(env)}
    assert wanted == runtime_closure(env), "stale: run docker/requirements.sh"
    # what the container must provide: torch's own stack, nothing Pare or its other deps use
    left_out = runtime_closure(env, provided=set()) - wanted
    assert "torch" in left_out and "triton" in left_out
    assert all(cuda_stack(p) or p in ("sympy", "mpmath", "setuptools") for p in left_out)
    assert {"numpy", "megatron-core", "transformers", "urllib3", "ray"} <= wanted


def test_pyproject_dependencies_are_covered():
    pins = {canonicalize_name(r.name): r.specifier for r in install_set()}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        if name in CONTAINER_PROVIDED:
            continue
        assert name in pins, f"{name} is neither installed nor container-provided"
        (pin,) = pins[name]
        assert dep.specifier.contains(pin.version, prereleases=True), (dep, pin)


def test_dockerfile_installs_the_set_without_resolving():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3" in text
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert any("-r docker/requirements.txt" in line for line in installs)
    assert installs and all("--no-deps" in line for line in installs), installs
    assert "docker/constrain.py docker/requirements.txt /etc/pip/constraint.txt" in text


def load_constrain():
    spec = importlib.util.spec_from_file_location("constrain", ROOT / "docker" / "constrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constraint_file_keeps_the_container_stack_and_takes_the_locked_pins(tmp_path, capsys):
    # the shape of an NGC /etc/pip/constraint.txt (names as the container spells them)
    ngc = ["torch==2.10.0a0+b4e4ee81d3.nv25.12", "transformer_engine==2.10.0+769ed77",
           "apex==0.1", "urllib3==2.5.0", "Typing_Extensions==4.15.0", "numpy==1.26.4",
           "triton==3.5.0", "sympy==1.14.0"]
    path = tmp_path / "constraint.txt"
    path.write_text("\n".join(ngc) + "\n")
    constrain = load_constrain()
    constrain.main(str(REQUIREMENTS), str(path))
    lines = [line for line in path.read_text().splitlines() if constrain.name(line)]
    for kept in ngc[:3] + ngc[-2:]:
        assert kept in lines
    pins = {canonicalize_name(r.name): r for r in install_set()}
    for line in lines:  # every constraint on an installed package is its pin
        name = constrain.name(line)
        if name in pins:
            assert str(Requirement(line)) == str(pins[name])
    assert lines.count("urllib3==1.26.20") == 1 and "typing-extensions==4.16.0" in lines
    assert "urllib3==2.5.0 -> urllib3==1.26.20" in capsys.readouterr().out
    before = path.read_text()
    _, changed = constrain.constrain(before, REQUIREMENTS.read_text())
    assert changed == []  # a second run changes nothing


# --- slurm/: the srun command each script builds, with stand-ins for srun and scontrol ---

def run_script(tmp_path, script, env, *args):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\nenv > "$SRUN_ENV"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\nprintf "node1\\nnode2\\n"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
            "SRUN_ARGS": str(tmp_path / "args"), "SRUN_ENV": str(tmp_path / "env"), **env}
    p = subprocess.run(["bash", str(ROOT / "slurm" / script), *args], cwd=work, env=full,
                       capture_output=True, text=True)
    if p.returncode:
        return p, None, None
    srun_env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines()
                    if "=" in line)
    return p, (tmp_path / "args").read_text().splitlines(), srun_env


def test_slurm_without_container_runs_in_the_current_environment(tmp_path):
    work = tmp_path / "work"
    p, args, env = run_script(tmp_path, "importance.sh", {
        "SLURM_JOB_ID": "123457", "SLURM_JOB_NODELIST": "node[1-2]", "GPUS_PER_NODE": "0"},
        "seq=l2")
    assert p.returncode == 0, p.stderr
    # the recipe (with its paths, relative to the submit directory) and the extra argument
    assert args == ["--kill-on-bad-exit=1", f"{work}/.venv/bin/pare", "importance",
                    "recipe=olmo3_7b_importance", "seq=l2"]
    assert env["MASTER_ADDR"] == "node1" and env["MASTER_PORT"] == str(20000 + 123457 % 10000)
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # GPUS_PER_NODE=0: gloo on CPU
    assert env["HF_HOME"] == f"{work}/.cache/huggingface" and Path(env["HF_HOME"]).is_dir()


def test_teacher_logits_script_passes_the_recipe_and_the_paths_set(tmp_path):
    p, args, _ = run_script(tmp_path, "teacher_logits.sh", {
        "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1", "GPUS_PER_NODE": "0",
        "OUTPUT": "/data/top32"}, "top_k=16")
    assert p.returncode == 0, p.stderr
    assert args[-4:] == ["teacher-logits", "recipe=olmo3_7b_teacher_logits", "output=/data/top32",
                         "top_k=16"]


def test_sparsify_script_passes_the_recipe_and_the_paths_set(tmp_path):
    p, args, _ = run_script(tmp_path, "sparsify.sh", {
        "SLURM_JOB_ID": "8", "SLURM_JOB_NODELIST": "node1", "GPUS_PER_NODE": "0",
        "SAVE_PATH": "/ckpt/sparse", "TP": "2"}, "method=sparsegpt")
    assert p.returncode == 0, p.stderr
    assert args[-5:] == ["sparsify", "recipe=olmo3_7b_sparsify", "save_path=/ckpt/sparse", "tp=2",
                         "method=sparsegpt"]


def test_search_script_passes_the_recipe_and_the_paths_set(tmp_path):
    p, args, _ = run_script(tmp_path, "search.sh", {
        "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "node1", "GPUS_PER_NODE": "0",
        "OUT_PATH": "/scores/search.json", "TP": "2"}, "retrain_top=2")
    assert p.returncode == 0, p.stderr
    assert args[-5:] == ["search", "recipe=olmo3_7b_search", "out_path=/scores/search.json",
                         "tp=2", "retrain_top=2"]


def test_slurm_with_container_uses_pyxis(tmp_path):
    hf = tmp_path / "hf"
    p, args, env = run_script(tmp_path, "prune.sh", {
        "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node1", "CONTAINER": "/img/pare+latest.sqsh",
        "NODES": "2", "TASKS_PER_NODE": "4", "GPUS_PER_NODE": "4", "HF_HOME": str(hf),
        "MASTER_PORT": "29999", "TP": "4", "PP": "2"})
    assert p.returncode == 0, p.stderr
    work = tmp_path / "work"
    assert args[:7] == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=4",
                        "--gpus-per-node=4", "--container-image=/img/pare+latest.sqsh",
                        f"--container-mounts={work}:{work},{hf}:{hf}",
                        f"--container-workdir={work}"]
    assert args[7:9] == ["pare", "prune"] and args[-2:] == ["tp=4", "pp=2"]
    assert env["MASTER_PORT"] == "29999" and env["HF_HOME"] == str(hf)
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_slurm_script_outside_a_job_says_so(tmp_path):
    p, _, _ = run_script(tmp_path, "import.sh", {})
    assert p.returncode != 0 and "submit with sbatch" in p.stderr
    assert not (tmp_path / "args").exists()


# --- the GPU of each task ---

def test_cuda_device_follows_the_visible_devices():
    assert [cuda_device(r, 8) for r in range(8)] == list(range(8))  # every task sees the node's 8
    assert [cuda_device(r, 1) for r in range(8)] == [0] * 8  # one GPU bound per task
    assert [cuda_device(r, 2) for r in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="no CUDA device"):
        cuda_device(0, 0)


def test_srun_tasks_form_the_process_group(tmp_path):
    """Two processes with only what srun sets (SLURM_PROCID / NTASKS / LOCALID; no RANK) join
    one gloo group at TP=2 and take LOCAL_RANK from SLURM_LOCALID."""
    code = ("import os, torch, torch.distributed as dist\n"
            "from megatron.core import parallel_state as ps\n"
            "from pare_nemo.parallel import init_distributed, destroy_distributed\n"
            "init_distributed(tp=2)\n"
            "t = torch.tensor([dist.get_rank() + 1.0]); dist.all_reduce(t)\n"
            "print(dist.get_rank(), dist.get_world_size(), ps.get_tensor_model_parallel_rank(),"
            " os.environ['LOCAL_RANK'], int(t.item()))\n"
            "destroy_distributed()\n")
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base |= {"SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
             "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=base | {"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert [out.split()[-5:] for out, _ in outs] == [["0", "2", "0", "0", "3"],
                                                     ["1", "2", "1", "1", "3"]]

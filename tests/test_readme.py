"""Every command line the README shows is run here (``pytest tests/test_readme.py`` runs only this).

Each ```bash block of README.md is split into logical lines (backslash continuations joined,
``# comments`` stripped) and every line must be handled by exactly one rule below; a line no rule
handles fails ``test_readme_every_line_has_one_rule``, so the README cannot gain a command that
nothing runs. ``test_readme_line`` then runs them:

- ``uv run pare …`` / ``uv run nemo llm …``: for real, in README order (``pare`` lines through
  ``pare_nemo.cli:main``, the console script's function, in this process; ``nemo llm`` lines from
  this environment's bin directory), all in one temporary working directory, so the README's relative paths chain
  (import -> importance -> prune -> export), on a tiny random Olmo 3 instead of the 7B
  (SUBSTITUTIONS below). The 7B prune recipes cannot shape a tiny model: those lines must fail with
  the recipe's target error, which proves the CLI -> recipe -> prune path.
- ``uv run pytest``: this suite itself (not run recursively).
- ``uv run python benchmarks/….py``: with PARE_BENCH_SMOKE=1 (each benchmark shrinks to a smoke run).
- ``[VAR=value …] sbatch …``: under stand-ins that check the command lines (tests/test_slurm.py
  runs the scripts under a real one-node Slurm; the README's lines include container ones): a fake
  ``sbatch`` runs the script at once as a one-node job, a fake ``srun`` runs the command as one local
  task (or, given a container image, only records the command line, which is then checked), a fake
  ``scontrol`` names localhost. They run in README order in a second temporary directory (the
  submit directory, holding the repository's slurm/ and .venv), so they chain among themselves.
- NOT_RUNNABLE: lines this machine cannot run (no Docker daemon, no enroot, no network beyond
  package registries), each with its reason; every entry must still match a README line.

Lines that need no other line (``pare demo``, the benchmarks) run in one background lane beside
the chains, so their tests come last (ids keep the README's line numbers); ``recipe=tiny_…`` lines
run there too, after the demo that made their models.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the environment `uv run` runs in

# The README's Olmo 3 7B specifics -> the tiny model's ({hf}, {data}, {budget} are filled in by the
# `work` fixture). Replaced where they stand as whole words.
SUBSTITUTIONS = {
    "allenai/Olmo-3-7B-Instruct": "{hf}",
    "allenai/Dolci-Instruct-SFT-7B": "{data}",
    "num_samples=1024": "num_samples=16",
    "seq_length=4096": "seq_length=64",
    "num_samples=64": "num_samples=8",
    "target_ffn_hidden_size=9216": "target_ffn_hidden_size=128",
    "target_hidden_size=3072": "target_hidden_size=48",
    "target_num_attention_heads=24": "target_num_attention_heads=2",
    "budget=4.5e9": "budget={budget}",
    "layers=[24,28,32]": "layers=[3,4]",
    "recipe=olmo3_7b_distill_width": "recipe=tiny_distill train_steps=10",
    "recipe=olmo3_7b_teacher_logits": "recipe=tiny_teacher_logits train_steps=10",
    "recipe=olmo3_7b_teacher_correction":
        "recipe=tiny_distill train_steps=10 alpha=1 teacher_path=none",
    # tiny_distill adds intermediate losses (measured), which need a teacher model beside it
    "teacher_path=none": "teacher_path=none intermediate_loss=none embedding_weight=0",
    "num_workers=8": "num_workers=2",
    "num_samples=256": "num_samples=8",
    # lm-eval's tasks need the Hub: Pare's local task, a few documents, short generations
    "tasks=mmlu,hellaswag,arc_challenge,gsm8k,ifeval":
        "tasks=pare_pydoc task_limit=10 max_new_tokens=4 batch_sizes=[1,2]",
}
# The same for the Slurm scripts' own 7B defaults: the stand-in job's environment (a VAR=value the
# README line sets wins). importance.sh's 7B recipe becomes the demo model's, on the paths the
# chain's import.sh wrote.
SLURM_DEFAULTS = {
    "import.sh": {"HF_PATH": "{hf}"},
    "importance.sh": {"RECIPE": "tiny_importance", "DATA": "{data}",
                      "MEGATRON_PATH": "checkpoints/olmo3-7b-instruct",
                      "SCORES_PATH": "scores/olmo3-7b-instruct.pt"},
}
# A 7B prune recipe on the tiny model fails on the first target it cannot reach, before any work.
# (slurm/prune.sh's default RECIPE is one.)
RECIPE_7B = re.compile(r"(?:recipe=|RECIPE=|--factory[= ])(olmo3_7b_\w+_4p5b)")
TARGET_ERROR = re.compile(r"target_\w+=\d+ must be in \[1, \d+\]")

NOT_RUNNABLE = {
    "curl -LsSf https://astral.sh/uv/install.sh": "no network here beyond package registries "
                                                  "(and uv is installed already)",
    "pip install uv": "would change the shared environment; .ci/run installs uv this way when no "
                      "uv runs",
    "docker build": "no Docker daemon on this machine",
    "docker tag": "no Docker daemon, no registry to push to",
    "enroot import": "no enroot (nor a Docker daemon to import from)",
    "mv pare+latest.sqsh": "moves the image `enroot import` makes",
}

# the output each stage writes, checked to exist after its line ran
OUTPUT = {"import": "megatron_path", "export": "hf_path", "importance": "scores_path",
          "prune": "save_path", "distill": "save_path", "eval": "output",
          "teacher-logits": "output", "sparsify": "save_path", "quantize": "output"}


# --- the README's command lines ---

def strip_comment(line: str) -> str:
    """``line`` without its ``# comment`` (a # at a word start, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_lines(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        joined = re.sub(r"\\\n", " ", block)
        lines += [s for s in (strip_comment(raw).strip() for raw in joined.splitlines()) if s]
    return lines


def env_prefix(line: str) -> tuple[dict, list[str]]:
    """``A=1 B=2 cmd …`` -> ({A: 1, B: 2}, [cmd, …]) in shell words."""
    try:
        words = shlex.split(line)
    except ValueError:
        return {}, []
    env = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


RULES = {
    "pare": lambda line: line.startswith("uv run pare "),
    "nemo": lambda line: line.startswith("uv run nemo llm "),
    "pytest": lambda line: line == "uv run pytest" or line.startswith("uv run pytest "),
    "benchmark": lambda line: re.match(r"uv run python benchmarks/\w+\.py\b", line) is not None,
    "sbatch": lambda line: env_prefix(line)[1][:1] == ["sbatch"],
    "not runnable": lambda line: any(line.startswith(p) for p in NOT_RUNNABLE),
}


def rules_for(line: str) -> list[str]:
    return [name for name, matches in RULES.items() if matches(line)]


def independent(line: str) -> bool:
    """Needs no chain's output: runs in the background lane, in README order (so a line on the
    demo's models, ``recipe=tiny_…``, runs after ``pare demo`` made them)."""
    return rules_for(line) == ["benchmark"] or line.startswith("uv run pare demo") or (
        rules_for(line) == ["pare"] and "recipe=tiny_" in line)


LINES = readme_lines(README.read_text())
ORDER = sorted(range(len(LINES)), key=lambda i: independent(LINES[i]))  # chains first


def test_readme_every_line_has_one_rule():
    assert LINES, "no ```bash block in README.md"
    bad = [f"{line!r}: {rules_for(line) or 'no rule'}" for line in LINES if len(rules_for(line)) != 1]
    assert not bad, "README command lines without exactly one rule in tests/test_readme.py:\n" + \
        "\n".join(bad)
    stale = [p for p in NOT_RUNNABLE if not any(line.startswith(p) for line in LINES)]
    assert not stale, f"NOT_RUNNABLE entries that match no README line any more: {stale}"


# --- how each rule runs a line: prepare -> subprocess arguments, check(result) ---

def substitute(line: str, fill: dict) -> str:
    for old, new in SUBSTITUTIONS.items():
        line = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w.])", new.format(**fill), line)
    return line


def output_of(p: subprocess.CompletedProcess) -> str:
    return (f"exit status {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n"
            f"--- stderr\n{p.stderr[-3000:]}")


def check_target_error(p: subprocess.CompletedProcess) -> None:
    assert p.returncode != 0, f"a 7B recipe on the tiny model should fail:\n{output_of(p)}"
    assert TARGET_ERROR.search(p.stdout + p.stderr), output_of(p)


def uv_words(line: str, work: dict) -> list[str]:
    return shlex.split(substitute(line, work["fill"]))[2:]  # less `uv run`


def prepare_uv(line: str, work: dict) -> dict:
    words = uv_words(line, work)
    return {"argv": [str(BIN / words[0]), *words[1:]], "cwd": work["cwd"]}


def check_uv(line: str, work: dict, p) -> None:
    if RECIPE_7B.search(line):
        return check_target_error(p)
    assert p.returncode == 0, output_of(p)
    words = uv_words(line, work)
    stage = words[2] if words[0] == "nemo" else words[1]
    if stage == "demo":
        assert "what it measured" in p.stdout, output_of(p)
    args = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    if stage in OUTPUT:
        assert (work["cwd"] / args[OUTPUT[stage]]).exists(), output_of(p)


def prepare_benchmark(line: str, work: dict) -> dict:
    return {"argv": [sys.executable, *shlex.split(line)[3:]], "cwd": ROOT,  # less `uv run python`
            "env": {"PARE_BENCH_SMOKE": "1"}}


def check_exit_0(line: str, work: dict, p) -> None:
    assert p.returncode == 0, output_of(p)


def slurm_script(line: str) -> str:
    return next(Path(w).name for w in env_prefix(line)[1] if w.endswith(".sh"))


def prepare_sbatch(line: str, work: dict) -> dict:
    fill, script = work["fill"], slurm_script(line)
    env = {k: v.format(**fill) for k, v in SLURM_DEFAULTS.get(script, {}).items()}
    env |= {"PATH": f"{work['bin']}:/usr/bin:/bin", "SRUN_ARGS": str(work["srun_args"]),
            "CUDA_VISIBLE_DEVICES": ""}
    work["srun_args"].unlink(missing_ok=True)
    return {"argv": substitute(line, fill), "cwd": work["cluster"], "env": env, "shell": True}


def check_sbatch(line: str, work: dict, p) -> None:
    cluster, (prefix, _), script = work["cluster"], env_prefix(line), slurm_script(line)
    if "CONTAINER" not in prefix and (
            RECIPE_7B.search(line) or (script == "prune.sh" and "RECIPE" not in prefix)):
        return check_target_error(p)
    assert p.returncode == 0, output_of(p)
    srun = work["srun_args"].read_text().splitlines()
    stage = script.removesuffix(".sh")
    if "CONTAINER" in prefix:  # recorded, not run: pyxis gets the image, the mounts, the workdir
        image = re.sub(r"\$\{?PWD\}?", str(cluster), prefix["CONTAINER"])
        assert f"--container-image={image}" in srun, srun
        mounts = next(a for a in srun if a.startswith("--container-mounts=")).split("=", 1)[1]
        assert f"{cluster}:{cluster}" in mounts.split(","), srun
        assert f"--container-workdir={cluster}" in srun, srun
        assert srun[srun.index("pare") + 1] == stage, srun
    else:  # the stage ran in the current environment (.venv after `uv sync`)
        assert srun[srun.index(f"{cluster}/.venv/bin/pare") + 1] == stage, srun


HANDLERS = {  # rule -> (prepare, check); None: nothing to run
    "pare": (prepare_uv, check_uv),
    "nemo": (prepare_uv, check_uv),
    "pytest": None,  # the suite this test is part of
    "benchmark": (prepare_benchmark, check_exit_0),
    "sbatch": (prepare_sbatch, check_sbatch),
    "not runnable": None,  # checked by test_readme_every_line_has_one_rule
}


def start(argv, cwd, env=None, shell=False) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    full.setdefault("OMP_NUM_THREADS", "1")  # two lanes on few cores: one thread each
    return subprocess.Popen(argv, cwd=cwd, env=full | (env or {}), shell=shell, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, executable="/bin/bash" if shell else None)


def finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        err += "\n[killed after 600 s]"
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# --- the environment the lines run in ---

def write_stand_ins(d: Path) -> None:
    scripts = {
        # runs the job script now, in the submit directory, as a one-node job; sbatch's own
        # options (--opt=value, --opt value, -X value, -Xvalue) are skipped
        "sbatch": """#!/bin/bash
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    --*=*|--exclusive|--wait|--parsable|--hold|--requeue|--no-requeue) shift ;;
    --*|-?) shift 2 ;;
    *) shift ;;
  esac
done
export SLURM_JOB_ID=4242 SLURM_JOB_NODELIST=localhost SLURM_JOB_NUM_NODES=1 SLURM_SUBMIT_DIR=$PWD
exec bash "$@"
""",
        # records its command line; runs the command as the step's one task on this machine,
        # unless it asks for a container image (no pyxis here)
        "srun": """#!/bin/bash
printf '%s\\n' "$@" > "$SRUN_ARGS"
for a in "$@"; do case $a in --container-image=*) exit 0 ;; esac; done
while [[ $1 == -* ]]; do shift; done
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 SLURM_NODEID=0
exec "$@"
""",
        "scontrol": "#!/bin/bash\necho localhost\n",
    }
    for name, text in scripts.items():
        (d / name).write_text(text)
        (d / name).chmod(0o755)


@pytest.fixture(scope="module")
def work(tmp_path_factory, request):
    """A tiny random Olmo 3 (hidden 64, FFN 256, 4 heads, 4 layers, vocab 512), chat records from
    pydoc text as a local .jsonl, the working directory of the uv lines, the Slurm submit
    directory with stand-in sbatch / srun / scontrol; and the background lane, started."""
    from transformers import Olmo3Config

    from pare_nemo.prune import num_params
    from pare_nemo.tiny import make_tiny_olmo3, pydoc_text

    root = tmp_path_factory.mktemp("readme")
    cwd, cluster, stand_ins = root / "cwd", root / "cluster", root / "bin"
    for d in (cwd, cluster, stand_ins):
        d.mkdir()
    work = {"cwd": cwd, "cluster": cluster, "bin": stand_ins, "srun_args": root / "srun_args"}
    hf = make_tiny_olmo3(root / "tiny-olmo3", vocab_size=512, hidden_size=64,
                         intermediate_size=256, num_heads=4, num_layers=4)
    text = pydoc_text()
    data = root / "chat.jsonl"
    with data.open("w") as f:
        for i in range(0, len(text), 2000):
            chunk = text[i:i + 2000]
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Explain this:\n{chunk[:200]}"},
                {"role": "assistant", "content": chunk}]}) + "\n")
    work["fill"] = {"hf": str(hf), "data": str(data),
                    "budget": str(int(0.7 * num_params(Olmo3Config.from_pretrained(hf))))}

    # what needs no other line starts now, one at a time, beside the chains
    lane, procs, work["background"] = ThreadPoolExecutor(1), [], {}

    def run_in_lane(kwargs):
        procs.append(start(**kwargs))
        return finish(procs[-1])

    selected = [item.callspec.params["i"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_readme_line"
                and item.module.__name__ == __name__]
    for i in selected:
        rule = rules_for(LINES[i])
        if independent(LINES[i]) and HANDLERS[rule[0]]:
            work["background"][i] = lane.submit(run_in_lane, HANDLERS[rule[0]][0](LINES[i], work))
    (cluster / "slurm").symlink_to(ROOT / "slurm")  # the scripts run from the repository root
    (cluster / ".venv").symlink_to(BIN.parent)  # ... after `uv sync`
    write_stand_ins(stand_ins)
    yield work
    lane.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.poll() is None:
            p.kill()


def line_id(i: int) -> str:
    return f"{i:02d}-" + re.sub(r"[^\w.=/+-]+", "_", LINES[i].removeprefix("uv run "))[:60]


@pytest.mark.parametrize("i", ORDER, ids=[line_id(i) for i in ORDER])
def test_readme_line(i, work):
    """README line ``i``: the chains in README order (later lines use what earlier ones wrote)."""
    line = LINES[i]
    rules = rules_for(line)
    assert len(rules) == 1, f"{line!r}: {rules or 'no rule'}"
    if HANDLERS[rules[0]] is None:
        return
    prepare, check = HANDLERS[rules[0]]
    if i in work["background"]:
        p = work["background"][i].result()
    elif rules[0] == "pare":  # what the `pare` script calls, without a new interpreter
        p = run_pare(**prepare(line, work))
    else:
        p = finish(start(**prepare(line, work)))
    check(line, work, p)


def run_pare(argv, cwd) -> subprocess.CompletedProcess:
    """``pare …`` in this process: ``pare_nemo.cli:main`` (the console script's entry point) in
    ``cwd``, its output captured and SystemExit turned into an exit status. A chain of ~17 stages
    saves an interpreter start each (~10-25 s of imports on 2 cores); ``pare demo`` and the
    ``nemo llm`` / sbatch lines still run as their own processes."""
    import contextlib
    import io
    import traceback

    from pare_nemo.cli import main

    out, err, code, here = io.StringIO(), io.StringIO(), 0, os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv[1:])
            except SystemExit as e:
                if e.code not in (None, 0):
                    code = e.code if isinstance(e.code, int) else 1
                    if not isinstance(e.code, int):
                        print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001  (a traceback, as the script would print)
                code = 1
                traceback.print_exc()
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())

"""Distillation quality: how much of the teacher a pruned student keeps for the tokens spent, and
which of distillation's options help. Everything runs through Pare's own stages (import,
importance, prune, distill, eval) on a tiny Olmo 3 that the benchmark builds and caches.

    uv run python benchmarks/bench_kd_quality.py             # the table (~40 min on 2 cores)
    uv run python benchmarks/bench_kd_quality.py --quick     # a smoke run, about a minute
                                                             # (also PARE_BENCH_SMOKE=1; tested)

1. Text every machine has without a hub: CPython's ``pydoc_data.topics`` and the docstrings of the
   standard library, numpy and torch of the locked environment, one document per module. Documents
   go to train / dev / test by a hash of their name.
2. A teacher: a tiny Olmo 3 (8 layers, hidden 96, 3 sliding : 1 full attention, window 64),
   trained from transformers' init with ``pare distill alpha=1`` (CE alone) on 2.01M train tokens,
   490 steps of 16 x 256: the same batch and schedule as the 10x scratch row, so that row is the
   student's architecture trained exactly as its teacher was.
3. ``pare importance`` on train text, then three students: ``width`` (hidden and FFN pruned to 50 %
   of the non-embedding parameters), ``depth`` (4 of 8 layers by Block Influence) and
   ``depth_protect`` (the same, never dropping a full-attention layer).
4. Rows, each over the data-order seeds (``Data.seed``): the teacher; each student zero-shot; KD
   on 1/10 of the teacher's tokens at ``KD()``'s defaults (logit forward KL, T=1, no CE, no
   intermediate losses: the papers' width recipe); CE fine-tuning of the pruned weights; the width
   architecture from random init on the same tokens and on the teacher's 10x; then one option
   changed at a time (temperature, top-k, reverse KL, JSD, alpha, intermediate + embedding losses
   with and without balance / projection / alpha=0.5, learning rate x0.3 / x3, warmup, teacher
   correction, iterative pruning in two rounds at half the tokens each).
5. ``pare eval`` on dev and on test documents (the same rows for every checkpoint): options are
   chosen on dev, reported on test, with the loss by position for the depth students.

Runs go to ``--workers`` processes (default 2, one thread each: on 2 cores that trains 1.6x faster
than one run with 2 threads), each run after what it needs; the teacher and the 10x scratch runs
start first. Measured alone on 2 CPU cores (2026-12-07): 38 min in all; the teacher 7 min, a 10x
scratch run 5.5 min, a student run 34-59 s, both evaluations ~2 min (``--seeds 1``: about a
third).

Writes ``<out>/results.json`` and ``<out>/kd_quality.png`` and prints the table. The teacher,
scores and students are cached in ``<out>`` (delete it to rebuild); each run directory too (a run
that finished is not redone).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Scale:
    hidden: int = 96
    ffn: int = 288
    layers: int = 8
    heads: int = 3
    head_dim: int = 32
    window: int = 64
    vocab: int = 2048
    seq: int = 256
    teacher_batch: int = 16  # the 10x scratch row's batch and schedule: the same steps and tokens
    teacher_steps: int = 490  # x 16 x 256 = 2.01M tokens
    student_batch: int = 16
    width_targets: tuple = (72, 152)  # hidden, FFN: 50.6 % of the non-embedding parameters
    eval_rows: int = 96
    importance_rows: int = 64
    seeds: tuple = (1, 2, 3)
    packages: tuple = ("numpy", "torch")  # docstrings beside the standard library's
    workers: int = 2  # runs at once, one thread each (2 cores: 1.6x one 2-thread run's rate)

    @property
    def student_steps(self) -> int:  # 1/10 of the teacher's tokens
        return self.teacher_steps * self.teacher_batch // self.student_batch // 10


QUICK = Scale(hidden=32, ffn=64, layers=4, heads=2, head_dim=16, window=16, vocab=384, seq=64,
              teacher_batch=8, teacher_steps=20, student_batch=4, width_targets=(24, 40),
              eval_rows=8, importance_rows=8, seeds=(1,), packages=())


# KD options, one changed at a time from KD()'s defaults (the width student); the
# intermediate + embedding row is tiny_distill's KD, and its alpha=0.5 row the two best together
ABLATIONS = {
    "T=2": dict(temperature=2.0),
    "top_k=8": dict(top_k=8),
    "reverse KL": dict(kd="reverse"),
    "JSD": dict(kd="jsd"),
    "alpha=0.5": dict(alpha=0.5),
    "+intermediate+embedding": dict(intermediate_loss="cosine", embedding_weight=1.0),
    "+intermediate+embedding, balance": dict(intermediate_loss="cosine", embedding_weight=1.0,
                                             balance=True),
    "+intermediate+embedding, projection": dict(intermediate_loss="cosine", embedding_weight=1.0,
                                                hidden_match="projection"),
    "+intermediate+embedding, alpha=0.5": dict(intermediate_loss="cosine", embedding_weight=1.0,
                                               alpha=0.5),
    "lr x0.3": dict(lr_scale=0.3),
    "lr x3": dict(lr_scale=3.0),
    "no warmup": dict(warmup=0.0),
    "warmup 20%": dict(warmup=0.2),
}


# ---------------------------------------------------------------- text


def documents(scale: Scale) -> list[tuple[str, str]]:
    """(name, text): pydoc topics, then one document per module of docstrings."""
    from pydoc_data.topics import topics

    docs = [(f"pydoc/{k}", topics[k]) for k in sorted(topics)]
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    roots += [(p, Path(sysconfig.get_paths()["purelib"]) / p) for p in scale.packages]
    for name, root in roots:
        files = sorted(root.rglob("*.py"))
        for f in files[:60] if scale is QUICK else files:
            rel = f.relative_to(root)
            if any(p in ("test", "tests", "site-packages", "idlelib") for p in rel.parts):
                continue
            try:
                tree = ast.parse(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            parts = [d for node in ast.walk(tree)
                     if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                          ast.AsyncFunctionDef))
                     and (d := ast.get_docstring(node)) and len(d) > 40]
            if parts:
                docs.append((f"{name}/{rel}", "\n\n".join(parts)))
    return docs


def split_of(name: str) -> str:
    h = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 20
    return "dev" if h == 0 else "test" if h == 1 else "train"


def write_text(out: Path, scale: Scale) -> dict[str, Path]:
    paths = {s: out / f"{s}.jsonl" for s in ("train", "dev", "test")}
    if all(p.exists() for p in paths.values()):
        return paths
    parts = {s: p.with_suffix(".partial") for s, p in paths.items()}
    files = {s: p.open("w") for s, p in parts.items()}
    for name, text in documents(scale):
        files[split_of(name)].write(json.dumps({"text": text}) + "\n")
    for s, f in files.items():
        f.close()
        parts[s].rename(paths[s])
    return paths


# ---------------------------------------------------------------- jobs


PRELOAD = ["pare_nemo.distill", "pare_nemo.eval", "pare_nemo.importance", "pare_nemo.prune",
           "conversion.convert"]


class Jobs:
    """Runs the benchmark's jobs on ``workers`` processes, one thread each. A job starts once the
    jobs in its ``after`` are done; of the jobs ready, the one asked for first starts first (so
    the teacher goes before the 10x scratch runs). A job is a module-level function; what it
    returns comes back through its Future. Workers are forked from a server that imported Pare's
    stages once (``forkserver``); each runs job after job. ``workers=1``: each job runs when asked
    for, in this process."""

    def __init__(self, workers: int):
        import multiprocessing as mp
        import threading
        from concurrent.futures import ProcessPoolExecutor

        self.workers, self.running, self.pending = workers, 0, []
        self.lock = threading.RLock()
        self.pool = None
        if workers > 1:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            threads = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"  # the server reads it as it starts, before torch
            try:
                self.pool = ProcessPoolExecutor(workers, mp_context=ctx)
                self.pool.submit(int).result()  # start the server now, with that variable
            finally:
                if threads is None:
                    os.environ.pop("OMP_NUM_THREADS")
                else:
                    os.environ["OMP_NUM_THREADS"] = threads

    def __call__(self, fn, *args, after=(), **kwargs):
        from concurrent.futures import Future

        future = Future()
        if self.pool is None:  # asked for in order: what it needs has already run
            for f in after:
                f.result()
            future.set_result(fn(*args, **kwargs))
            return future
        with self.lock:
            self.pending.append((fn, args, kwargs, list(after), future))
        self._start()  # and again whenever a job ends (_finished): what waited may start then
        return future

    def _start(self) -> None:
        with self.lock:
            while self.running < self.workers:
                job = next((j for j in self.pending if all(f.done() for f in j[3])), None)
                if job is None:
                    return
                self.pending.remove(job)
                fn, args, kwargs, after, future = job
                failed = [f.exception() for f in after if f.exception()]
                if failed:
                    future.set_exception(failed[0])
                    continue
                self.running += 1
                self.pool.submit(fn, *args, **kwargs).add_done_callback(
                    lambda done, future=future: self._finished(done, future))

    def _finished(self, done, future) -> None:
        with self.lock:
            self.running -= 1
        if done.exception():
            future.set_exception(done.exception())
        else:
            future.set_result(done.result())
        self._start()

    def close(self, failed: bool = False) -> None:
        if self.pool:
            self.pending.clear()
            if failed:  # stop the runs still going
                for p in list(getattr(self.pool, "_processes", {}).values()):
                    p.terminate()
            self.pool.shutdown(wait=not failed, cancel_futures=True)


# ---------------------------------------------------------------- models


def hf_config(scale: Scale, tokenizer, hidden: int | None = None, ffn: int | None = None):
    """The teacher's shape, or the width student's (``hidden``, ``ffn``; heads and head size
    stay the teacher's, as pruning keeps them)."""
    from pare_nemo.tiny import tiny_config

    c = tiny_config(vocab_size=len(tokenizer), hidden_size=hidden or scale.hidden,
                    intermediate_size=ffn or scale.ffn, num_layers=scale.layers,
                    num_heads=scale.heads, head_dim=scale.head_dim, sliding_window=scale.window)
    c.pad_token_id, c.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    return c


def random_init(config, tok_dir: str, path: Path, seed: int = 0) -> str:
    """A Megatron checkpoint of ``config`` from transformers' init (a job)."""
    import torch
    from transformers import AutoTokenizer, Olmo3ForCausalLM

    from conversion.convert import import_hf

    mg = path / "megatron"
    if not (mg / "model_config.json").exists():
        torch.manual_seed(seed)
        Olmo3ForCausalLM(config).save_pretrained(path / "hf")
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path / "hf")
        import_hf(str(path / "hf"), str(mg), overwrite=True)
    return str(mg)


def train(student: str, save: Path, data: str, scale: Scale, steps: int, batch: int, seed: int,
          teacher: str | None = None, lr: float = 3e-3, warmup: float = 0.1, **kd) -> str:
    """One ``pare distill`` run (``alpha=1`` and no teacher: CE alone); a finished run is reused.
    (A job.)"""
    from pare_nemo.distill import distill

    if (save / "done").exists():
        return str(save)
    t0 = time.time()
    distill(student_path=student, teacher_path=teacher, data=data, save_path=str(save),
            seed=seed, train_steps=steps, global_batch_size=batch,
            micro_batch_size=min(batch, 8), seq_length=scale.seq, lr=lr, min_lr=lr / 10,
            warmup_steps=int(warmup * steps), save_interval=steps, log_interval=max(steps // 4, 1),
            tensorboard=False, dtype="float32", **kd)
    (save / "done").write_text(f"{time.time() - t0:.1f}\n")  # the run's seconds
    return str(save)


def score(model: str, scores: Path, text: str, scale: Scale, layer_loss_samples: int) -> str:
    """``pare importance`` on train text (a job)."""
    from pare_nemo.importance import importance

    if not scores.exists():
        importance(megatron_path=model, scores_path=str(scores), data=text,
                   num_samples=scale.importance_rows, seq_length=scale.seq, micro_batch_size=8,
                   layer_loss_samples=layer_loss_samples, report=False)
    return str(scores)


def pruned(model: str, scores: str, path: Path, **targets) -> str:
    """``pare prune`` (a job)."""
    from pare_nemo.prune import prune

    if not (path / "model_config.json").exists():
        prune(megatron_path=model, scores_path=scores, save_path=str(path), overwrite=True,
              **targets)
    return str(path)


def students(teacher: str, scores_path: Path, text: str, paths: dict[str, str],
             scale: Scale) -> dict:
    """Importance on the teacher, then the three students at ``paths`` (a job)."""
    scores = score(teacher, scores_path, text, scale, layer_loss_samples=16)
    hidden, ffn = scale.width_targets
    return {name: pruned(teacher, scores, Path(paths[name]), **targets) for name, targets in (
        ("width", dict(target_hidden_size=hidden, target_ffn_hidden_size=ffn)),
        ("depth", dict(target_num_layers=scale.layers // 2, layer_metric="layer")),
        ("depth_protect", dict(target_num_layers=scale.layers // 2, layer_metric="layer",
                               protect_full_attention=True)))}


def iterative(teacher: str, scores: str, text: str, data: str, scale: Scale, seed: int,
              save: Path) -> str:
    """Prune halfway, distill half the tokens, score again, prune to the target, distill the
    other half (a job)."""
    hidden, ffn = scale.width_targets
    half = dict(target_hidden_size=(scale.hidden + hidden) // 2 // 8 * 8,
                target_ffn_hidden_size=(scale.ffn + ffn) // 2 // 8 * 8)
    steps, batch = scale.student_steps, scale.student_batch
    first = train(pruned(teacher, scores, save / "mid_pruned", **half), save / "round1", data,
                  scale, steps // 2, batch, seed, teacher=teacher)
    again = score(first, save / "round1_scores.pt", text, scale, layer_loss_samples=0)
    final = pruned(first, again, save / "final_pruned", target_hidden_size=hidden,
                   target_ffn_hidden_size=ffn)
    return train(final, save / "round2", data, scale, steps - steps // 2, batch, seed,
                 teacher=teacher)


def evaluate_split(paths: list[str], text: str, result: Path, scale: Scale) -> dict:
    """``pare eval`` of every checkpoint on one split's documents (a job): {path: eval row}."""
    from pare_nemo.eval import evaluate

    names = {p: f"c{i}" for i, p in enumerate(paths)}
    stamp = result.with_suffix(".paths.json")
    if not result.exists() or not stamp.exists() or json.loads(stamp.read_text()) != paths:
        evaluate(checkpoints=",".join(f"{names[p]}:{p}" for p in paths), data=text,
                 output=str(result), report=False, num_samples=scale.eval_rows,
                 seq_length=scale.seq, micro_batch_size=8, position_bucket=scale.window,
                 overwrite=True)
        stamp.write_text(json.dumps(paths))
    by_name = {r["name"]: r for r in json.loads(result.read_text())}
    return {p: by_name[names[p]] for p in paths}


# ---------------------------------------------------------------- the benchmark


def build(out: Path, scale: Scale, say) -> dict:
    """Text, tokenizer and tokenized train data (cached; here, before any job)."""
    from transformers import AutoTokenizer

    from pare_nemo.data import prepare_data
    from pare_nemo.tiny import make_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    text = write_text(out, scale)
    tok_dir = out / "tokenizer"
    if not tok_dir.exists():
        train_text = "\n\n".join(json.loads(x)["text"] for x in text["train"].open())
        make_tokenizer(scale.vocab, train_text[:3_000_000]).save_pretrained(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    data = out / "data" / "train"
    if not data.with_suffix(".bin").exists():
        prepare_data(str(text["train"]), str(tok_dir), str(data))
    say(f"text: {', '.join(f'{k} {v.stat().st_size / 1e6:.1f} MB' for k, v in text.items())}")
    return dict(text={k: str(v) for k, v in text.items()}, data=str(data), tok_dir=str(tok_dir),
                tokenizer=tokenizer)


def runs(out: Path, scale: Scale, env: dict, jobs: Jobs, say) -> dict[str, list[str]]:
    """Every row's checkpoints, one per seed (the teacher and zero-shot rows: one). Jobs are asked
    for in the order they should start: the teacher, then the 10x scratch runs (which need no
    teacher), then what waits for the teacher."""
    steps, batch, data = scale.student_steps, scale.student_batch, env["data"]
    tok, text = env["tok_dir"], env["text"]["train"]
    t0 = time.time()
    teacher, corrected = str(out / "teacher"), str(out / "teacher_corrected")
    st = {s: str(out / "pruned" / s) for s in ("width", "depth", "depth_protect")}
    teacher_init = jobs(random_init, hf_config(scale, env["tokenizer"]), tok, out / "teacher_init")
    scratch_init = jobs(random_init, hf_config(scale, env["tokenizer"], *scale.width_targets),
                        tok, out / "scratch_init")
    trained = jobs(train, str(out / "teacher_init" / "megatron"), out / "teacher", data, scale,
                   scale.teacher_steps, scale.teacher_batch, 0, alpha=1.0, after=[teacher_init])
    planned: dict[str, list] = {}

    def each(name, fn, *args, after=(), **kwargs):  # one job per seed
        folder = re.sub(r"[^A-Za-z0-9.=]+", "_", name).strip("_")
        planned[name] = [jobs(fn, *args, seed=seed, save=out / "runs" / folder / f"seed{seed}",
                              after=after, **kwargs) for seed in scale.seeds]

    scratch = str(out / "scratch_init" / "megatron")
    each("width arch: random init, 10x tokens", train, scratch, data=data, scale=scale,
         steps=10 * steps, batch=batch, alpha=1.0, after=[scratch_init])
    made = jobs(students, teacher, out / "scores.pt", text, st, scale, after=[trained])
    kd = dict(data=data, scale=scale, steps=steps, batch=batch)
    for s in st:
        each(f"{s}: KD", train, st[s], teacher=teacher, after=[made], **kd)
    each("width: CE fine-tune", train, st["width"], alpha=1.0, after=[made], **kd)
    each("width arch: random init", train, scratch, alpha=1.0, after=[scratch_init], **kd)
    for name, opts in ABLATIONS.items():
        opts = dict(opts)
        lr = 3e-3 * opts.pop("lr_scale", 1.0)
        each(f"width: KD, {name}", train, st["width"], teacher=teacher, lr=lr,
             warmup=opts.pop("warmup", 0.1), after=[made], **kd, **opts)
    fixed = jobs(train, teacher, out / "teacher_corrected", data, scale, steps, batch, 0,
                 alpha=1.0, lr=3e-4, after=[trained])
    each("width: KD, teacher correction", train, st["width"], teacher=corrected,
         after=[made, fixed], **kd)
    each("width: KD, iterative pruning (2 rounds)", iterative, teacher, str(out / "scores.pt"),
         text, data, scale, after=[made])

    rows: dict[str, list[str]] = {"teacher": [trained.result()]}
    made.result()
    rows |= {f"{s}: zero-shot": [p] for s, p in st.items()}
    ten_x = "width arch: random init, 10x tokens"
    order = [n for n in planned if n != ten_x]  # the table's order: 10x after 1x
    order.insert(order.index("width arch: random init") + 1, ten_x)
    for name in order:
        rows[name] = [f.result() for f in planned[name]]
    say(f"every run done ({time.time() - t0:.0f} s)")
    return rows


def evaluate_rows(out: Path, scale: Scale, env: dict, rows: dict[str, list[str]],
                  jobs: Jobs) -> dict:
    """{split: {checkpoint path: eval.json row}} on dev and test documents (two jobs)."""
    paths = sorted({p for ps in rows.values() for p in ps})
    found = {split: jobs(evaluate_split, paths, env["text"][split], out / f"eval_{split}.json",
                         scale) for split in ("dev", "test")}
    return {split: f.result() for split, f in found.items()}


def summarize(rows: dict[str, list[str]], evals: dict) -> list[dict]:
    table = []
    for name, paths in rows.items():
        entry = {"row": name, "seeds": len(paths)}
        for split in ("dev", "test"):
            losses = [evals[split][p]["loss"] for p in paths]
            entry[split] = statistics.fmean(losses)
            entry[f"{split}_spread"] = (max(losses) - min(losses)) / 2
            entry[f"{split}_losses"] = losses
        entry["params"] = evals["test"][paths[0]]["non_embedding_params"]
        pos = [evals["test"][p].get("by_position") for p in paths]
        if pos[0]:
            entry["by_position"] = {"start": pos[0]["start"], "loss": [
                statistics.fmean(b["loss"][k] for b in pos) for k in range(len(pos[0]["loss"]))]}
        table.append(entry)
    return table


def print_table(table: list[dict], scale: Scale) -> None:
    ref = {e["row"]: e for e in table}
    kd = ref.get("width: KD")
    print(f"\nheld-out loss (mean over seeds {list(scale.seeds)} ± half their range); "
          "options chosen on dev, reported on test")
    print(f"{'row':48s} {'seeds':>5s} {'non-emb':>8s} {'dev':>16s} {'test':>16s} "
          f"{'test - KD':>10s}")
    for e in table:
        d = f"{e['test'] - kd['test']:+.4f}" if kd and e["row"].startswith("width") else ""
        print(f"{e['row']:48s} {e['seeds']:5d} {e['params'] / 1e6:7.2f}M {e['dev']:9.4f} "
              f"±{e['dev_spread']:.4f}"
              f" {e['test']:9.4f} ±{e['test_spread']:.4f} {d:>10s}")
    pos = [e for e in table if "by_position" in e and e["row"].startswith(("teacher", "depth"))]
    if pos:
        starts = pos[0]["by_position"]["start"]
        print("\nloss by position in documents (test), buckets of the sliding window:")
        print(f"{'row':48s} " + " ".join(f"{s:>8d}" for s in starts))
        for e in pos:
            print(f"{e['row']:48s} " + " ".join(f"{v:8.4f}" for v in e["by_position"]["loss"]))


def plot(table: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [2, 1]})
    names = [e["row"] for e in table]
    a.barh(range(len(table)), [e["test"] for e in table],
           xerr=[e["test_spread"] for e in table], color="tab:blue")
    a.set_yticks(range(len(table)), names, fontsize=7)
    a.invert_yaxis()
    lo = min(e["test"] for e in table)
    a.set_xlim(lo - 0.2, max(e["test"] for e in table) + 0.1)
    a.set_title("held-out (test) loss, mean ± half range over seeds")
    for e in table:
        if "by_position" in e and e["row"].startswith(("teacher", "depth")):
            bp = e["by_position"]
            b.plot(bp["start"], bp["loss"], marker="o", label=e["row"])
    b.set_xlabel("position in document (bucket start)")
    b.set_title("test loss by position")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds)")
    ap.add_argument("--out", default=None, help="cache and results (default: bench_kd_quality/;"
                                                " --quick: a temporary directory)")
    ap.add_argument("--seeds", default=None, help="data-order seeds, e.g. 1,2,3")
    ap.add_argument("--workers", type=int, default=None,
                    help="runs at once, one thread each (default 2; 1: in this process)")
    args = ap.parse_args(argv)
    quick = args.quick or bool(os.environ.get("PARE_BENCH_SMOKE"))
    scale = QUICK if quick else Scale()
    if args.seeds:
        scale = replace(scale, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.workers:
        scale = replace(scale, workers=args.workers)
    out = Path(args.out or (tempfile.mkdtemp(prefix="bench_kd_quality_") if quick
                            else "bench_kd_quality"))
    t0 = time.time()

    def say(msg):
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    env = build(out, scale, say)
    jobs, failed = Jobs(scale.workers), True
    try:
        rows = runs(out, scale, env, jobs, say)
        table = summarize(rows, evaluate_rows(out, scale, env, rows, jobs))
        failed = False
    finally:
        jobs.close(failed)
    print_table(table, scale)
    bad = [e["row"] for e in table if not (math.isfinite(e["dev"]) and math.isfinite(e["test"]))]
    assert not bad and len(table) == 10 + len(ABLATIONS) + 2, f"rows missing or not finite: {bad}"
    kd, scratch10 = ({e["row"]: e for e in table}[k] for k in
                     ("width: KD", "width arch: random init, 10x tokens"))
    verdict = {"kd_minus_scratch_10x": kd["test"] - scratch10["test"],
               "seconds": time.time() - t0, "scale": scale.__dict__ | {
                   "student_steps": scale.student_steps}}
    (out / "results.json").write_text(json.dumps({"table": table, **verdict}, indent=2,
                                                 default=list))
    plot(table, out / "kd_quality.png")
    say(f"KD - scratch(10x tokens) on test: {verdict['kd_minus_scratch_10x']:+.4f}; "
        f"{out / 'results.json'}, {out / 'kd_quality.png'}")
    if quick and not args.out:  # a smoke run leaves nothing behind
        shutil.rmtree(out)
    return {"table": table, **verdict}


if __name__ == "__main__":
    main()

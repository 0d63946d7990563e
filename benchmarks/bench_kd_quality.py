"""Distillation quality: how much of the teacher a pruned student keeps for the tokens spent, and
which of distillation's options help. Everything runs through Pare's own stages (import,
importance, prune, distill, eval) on a tiny Olmo 3 that the benchmark builds and caches.

    uv run python benchmarks/bench_kd_quality.py             # the table (~1.5 h on 2 cores)
    uv run python benchmarks/bench_kd_quality.py --quick     # a smoke run, under a minute
                                                             # (also PARE_BENCH_SMOKE=1; tested)

1. Text every machine has without a hub: CPython's ``pydoc_data.topics`` and the docstrings of the
   standard library, numpy and torch of the locked environment, one document per module. Documents
   go to train / dev / test by a hash of their name.
2. A teacher: a tiny Olmo 3 (8 layers, 3 sliding : 1 full attention, window 64), trained from
   transformers' init with ``pare distill alpha=1`` (CE alone) on ``TEACHER_TOKENS`` train tokens.
3. ``pare importance`` on train text, then three students: ``width`` (hidden and FFN pruned to 50 %
   of the non-embedding parameters), ``depth`` (4 of 8 layers by Block Influence) and
   ``depth_protect`` (the same, never dropping a full-attention layer).
4. Rows, each over the data-order seeds (``Data.seed``): the teacher; each student zero-shot; KD at
   ``tiny_distill``'s KD defaults on 1/10 of the teacher's tokens; CE fine-tuning of the pruned
   weights; the width architecture from random init on the same tokens and on the teacher's 10x;
   then one option changed at a time (temperature, top-k, reverse KL, JSD, alpha, intermediate +
   embedding losses with and without balance / projection, learning rate x0.3 / x3, warmup,
   teacher correction, iterative pruning in two rounds at half the tokens each).
5. ``pare eval`` on dev and on test documents (the same rows for every checkpoint): options are
   chosen on dev, reported on test, with the loss by position for the depth students.

Time on 2 CPU cores: teacher ~10 min, each student run ~65 s (x 3 seeds x 20 rows), the 10x
scratch runs ~6 min each, both evaluations ~3 min: about 1.5 h (``--seeds 1``: ~35 min).

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
    hidden: int = 128
    ffn: int = 384
    layers: int = 8
    heads: int = 4
    window: int = 64
    vocab: int = 2048
    seq: int = 256
    teacher_batch: int = 32
    teacher_steps: int = 260  # x 32 x 256 = 2.13M tokens
    student_batch: int = 16
    width_targets: tuple = (96, 304)  # hidden, FFN: 50.3 % of the non-embedding parameters
    eval_rows: int = 96
    importance_rows: int = 64
    seeds: tuple = (1, 2, 3)
    packages: tuple = ("numpy", "torch")  # docstrings beside the standard library's

    @property
    def student_steps(self) -> int:  # 1/10 of the teacher's tokens
        return self.teacher_steps * self.teacher_batch // self.student_batch // 10


QUICK = Scale(hidden=32, ffn=64, layers=4, heads=2, window=16, vocab=384, seq=64,
              teacher_batch=8, teacher_steps=20, student_batch=4, width_targets=(24, 40),
              eval_rows=8, importance_rows=8, seeds=(1,), packages=())

# KD options, one changed at a time from tiny_distill's defaults (the width student)
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


# ---------------------------------------------------------------- models


def hf_config(scale: Scale, tokenizer):
    from pare_nemo.tiny import tiny_config

    c = tiny_config(vocab_size=len(tokenizer), hidden_size=scale.hidden,
                    intermediate_size=scale.ffn, num_layers=scale.layers, num_heads=scale.heads,
                    sliding_window=scale.window)
    c.pad_token_id, c.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    return c


def random_init(config, tokenizer, path: Path, seed: int = 0) -> str:
    """A Megatron checkpoint of ``config`` from transformers' init."""
    import torch
    from transformers import Olmo3ForCausalLM

    from conversion.convert import import_hf

    mg = path / "megatron"
    if not (mg / "model_config.json").exists():
        torch.manual_seed(seed)
        Olmo3ForCausalLM(config).save_pretrained(path / "hf")
        tokenizer.save_pretrained(path / "hf")
        import_hf(str(path / "hf"), str(mg), overwrite=True)
    return str(mg)


def train(student: str, save: Path, data: str, scale: Scale, steps: int, batch: int, seed: int,
          teacher: str | None = None, lr: float = 3e-3, warmup: float = 0.1, **kd) -> str:
    """One ``pare distill`` run (``alpha=1`` and no teacher: CE alone); a finished run is reused."""
    from pare_nemo.distill import distill

    if (save / "done").exists():
        return str(save)
    distill(student_path=student, teacher_path=teacher, data=data, save_path=str(save),
            seed=seed, train_steps=steps, global_batch_size=batch,
            micro_batch_size=min(batch, 8), seq_length=scale.seq, lr=lr, min_lr=lr / 10,
            warmup_steps=int(warmup * steps), save_interval=steps, log_interval=max(steps // 4, 1),
            tensorboard=False, dtype="float32", **kd)
    (save / "done").touch()
    return str(save)


# ---------------------------------------------------------------- the benchmark


def build(out: Path, scale: Scale, say) -> dict:
    """Text, tokenizer, data, teacher, importance and the three pruned students (cached)."""
    from transformers import AutoTokenizer

    from pare_nemo.data import prepare_data
    from pare_nemo.importance import importance
    from pare_nemo.prune import prune
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
    meta = json.loads(data.with_suffix(".json").read_text())
    say(f"text: train {meta.get('tokens', '?')} tokens; dev/test: {text['dev']}, "
        f"{text['test']}")
    config = hf_config(scale, tokenizer)
    t0 = time.time()
    teacher = train(random_init(config, tokenizer, out / "teacher_init"), out / "teacher",
                    str(data), scale, scale.teacher_steps, scale.teacher_batch, seed=0,
                    alpha=1.0)
    say(f"teacher: {scale.teacher_steps * scale.teacher_batch * scale.seq} tokens "
        f"({time.time() - t0:.0f} s)")
    scores = out / "scores.pt"
    if not scores.exists():
        importance(megatron_path=teacher, scores_path=str(scores), data=str(text["train"]),
                   num_samples=scale.importance_rows, seq_length=scale.seq, micro_batch_size=8,
                   layer_loss_samples=16, report=False)
    students = {}
    hidden, ffn = scale.width_targets
    for name, targets in (
            ("width", dict(target_hidden_size=hidden, target_ffn_hidden_size=ffn)),
            ("depth", dict(target_num_layers=scale.layers // 2, layer_metric="layer")),
            ("depth_protect", dict(target_num_layers=scale.layers // 2, layer_metric="layer",
                                   protect_full_attention=True))):
        path = out / "pruned" / name
        if not (path / "model_config.json").exists():
            prune(megatron_path=teacher, scores_path=str(scores), save_path=str(path),
                  overwrite=True, **targets)
        students[name] = str(path)
    return dict(text=text, data=str(data), tokenizer=tokenizer, teacher=teacher, scores=scores,
                students=students, config=config)


def runs(out: Path, scale: Scale, env: dict, say) -> dict[str, list[str]]:
    """Every row's checkpoints, one per seed (the teacher and zero-shot rows: one)."""
    from pare_nemo.checkpoint import read_model_config
    from pare_nemo.importance import importance
    from pare_nemo.prune import prune

    steps, batch, data = scale.student_steps, scale.student_batch, env["data"]
    teacher, st = env["teacher"], env["students"]
    rows: dict[str, list[str]] = {"teacher": [teacher]}
    rows |= {f"{s}: zero-shot": [p] for s, p in st.items()}
    width_cfg, _, _ = read_model_config(st["width"])
    scratch = random_init(width_cfg, env["tokenizer"], out / "scratch_init")

    def each(name, fn):
        t0 = time.time()
        folder = re.sub(r"[^A-Za-z0-9.=]+", "_", name).strip("_")
        rows[name] = [fn(seed, out / "runs" / folder / f"seed{seed}") for seed in scale.seeds]
        say(f"{name}: {time.time() - t0:.0f} s")

    for s in st:
        each(f"{s}: KD", lambda seed, d, s=s: train(st[s], d, data, scale, steps, batch, seed,
                                                    teacher=teacher))
    each("width: CE fine-tune", lambda seed, d: train(st["width"], d, data, scale, steps, batch,
                                                      seed, alpha=1.0))
    each("width arch: random init", lambda seed, d: train(scratch, d, data, scale, steps, batch,
                                                          seed, alpha=1.0))
    each("width arch: random init, 10x tokens",
         lambda seed, d: train(scratch, d, data, scale, 10 * steps, batch, seed, alpha=1.0))
    for name, opts in ABLATIONS.items():
        opts = dict(opts)
        lr = 3e-3 * opts.pop("lr_scale", 1.0)
        warmup = opts.pop("warmup", 0.1)
        each(f"width: KD, {name}",
             lambda seed, d, o=opts, lr=lr, w=warmup: train(st["width"], d, data, scale, steps,
                                                            batch, seed, teacher=teacher, lr=lr,
                                                            warmup=w, **o))
    corrected = train(teacher, out / "teacher_corrected", data, scale, steps, batch, seed=0,
                      alpha=1.0, lr=3e-4)
    each("width: KD, teacher correction",
         lambda seed, d: train(st["width"], d, data, scale, steps, batch, seed,
                               teacher=corrected))

    hidden, ffn = scale.width_targets

    def iterative(seed, d):  # prune halfway, distill, score again, prune to the target, distill
        half = dict(target_hidden_size=(scale.hidden + hidden) // 2 // 8 * 8,
                    target_ffn_hidden_size=(scale.ffn + ffn) // 2 // 8 * 8)
        mid = d / "mid_pruned"
        if not (mid / "model_config.json").exists():
            prune(megatron_path=teacher, scores_path=str(env["scores"]), save_path=str(mid),
                  overwrite=True, **half)
        first = train(str(mid), d / "round1", data, scale, steps // 2, batch, seed,
                      teacher=teacher)
        scores = d / "round1_scores.pt"
        if not scores.exists():
            importance(megatron_path=first, scores_path=str(scores),
                       data=str(env["text"]["train"]), num_samples=scale.importance_rows,
                       seq_length=scale.seq, micro_batch_size=8, layer_loss_samples=0,
                       report=False)
        final = d / "final_pruned"
        if not (final / "model_config.json").exists():
            prune(megatron_path=first, scores_path=str(scores), save_path=str(final),
                  overwrite=True, target_hidden_size=hidden, target_ffn_hidden_size=ffn)
        return train(str(final), d / "round2", data, scale, steps - steps // 2, batch, seed,
                     teacher=teacher)

    each("width: KD, iterative pruning (2 rounds)", iterative)
    return rows


def evaluate_rows(out: Path, scale: Scale, env: dict, rows: dict[str, list[str]]) -> dict:
    """{split: {checkpoint path: eval.json row}} on dev and test documents."""
    from pare_nemo.eval import evaluate

    paths = sorted({p for ps in rows.values() for p in ps})
    names = {p: f"c{i}" for i, p in enumerate(paths)}
    found = {}
    for split in ("dev", "test"):
        result = out / f"eval_{split}.json"
        if not result.exists() or set(json.loads((out / "eval_paths.json").read_text())
                                       if (out / "eval_paths.json").exists() else []) \
                != set(paths):
            evaluate(checkpoints=",".join(f"{names[p]}:{p}" for p in paths),
                     data=str(env["text"][split]), output=str(result), report=False,
                     num_samples=scale.eval_rows, seq_length=scale.seq, micro_batch_size=8,
                     position_bucket=scale.window, overwrite=True)
        by_name = {r["name"]: r for r in json.loads(result.read_text())}
        found[split] = {p: by_name[names[p]] for p in paths}
    (out / "eval_paths.json").write_text(json.dumps(paths))
    return found


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
    args = ap.parse_args(argv)
    quick = args.quick or bool(os.environ.get("PARE_BENCH_SMOKE"))
    scale = QUICK if quick else Scale()
    if args.seeds:
        scale = replace(scale, seeds=tuple(int(s) for s in args.seeds.split(",")))
    out = Path(args.out or (tempfile.mkdtemp(prefix="bench_kd_quality_") if quick
                            else "bench_kd_quality"))
    t0 = time.time()

    def say(msg):
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    env = build(out, scale, say)
    rows = runs(out, scale, env, say)
    table = summarize(rows, evaluate_rows(out, scale, env, rows))
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

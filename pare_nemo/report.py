"""The compression report: downstream tasks through lm-evaluation-harness, generation speed and
sample generations with transformers, and a side-by-side markdown + PNG report of the teacher and
its pruned / distilled students.

Everything reads exported Hugging Face directories (``pare export``). ``run_tasks`` takes lm-eval's
task names (``mmlu``, ``hellaswag``, ``arc_challenge``, ``gsm8k``, ``ifeval`` ...; ``uv run lm-eval
ls tasks`` lists them) and Pare's own local task ``pare_pydoc`` (pare_nemo/tasks/: built from
CPython's ``pydoc_data.topics``, so it runs where nothing reaches the Hub). ``write_report`` takes
one dict per checkpoint as ``pare eval`` writes them (name, path, kind, params,
non_embedding_params, loss, ppl, tokens) plus what the functions here return under ``tasks``,
``speed`` and ``samples``.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import time
from pathlib import Path

import torch

from pare_nemo.tasks import TASK_DIR

LIST_TASKS = (f"`uv run lm-eval ls tasks --include_path {TASK_DIR}` (lm-eval's tasks and Pare's "
              "own, pare_pydoc and pare_pydoc_passages; or `uv run python -m lm_eval ls tasks`)")
REPORT_MD, REPORT_PNG, REPORT_JSON = "report.md", "report.png", "report.json"
# the prompt set `pare eval` times generation on (the same for every model) and whose first
# SAMPLES it shows side by side: short instructions of the kinds an Instruct model is asked
PROMPTS = [
    "Explain in two sentences what a Python decorator does.",
    "Write a haiku about autumn rain.",
    "What is the capital of Australia, and why is it not Sydney?",
    "List three differences between a list and a tuple in Python.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "Give a short recipe for pancakes.",
    "Translate 'Where is the train station?' into French and German.",
    "Why is the sky blue? Answer for a ten-year-old.",
]
SAMPLES = 3


class UnknownTaskError(ValueError):
    """A task name lm-evaluation-harness does not know; the message says how to list them."""


# ---------------------------------------------------------------- loading


def _check_hf_dir(hf_dir: str | Path) -> Path:
    path = Path(hf_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory (no config.json); "
                                "export a Megatron checkpoint with `pare export` first")
    return path


def _device_dtype() -> tuple[str, str]:
    """cuda with the checkpoint's dtype, or cpu in float32."""
    return ("cuda", "auto") if torch.cuda.is_available() else ("cpu", "float32")


def has_chat_template(hf_dir: str | Path) -> bool:
    """Whether the directory's tokenizer has a chat template (an Instruct / chat model)."""
    from transformers import AutoTokenizer

    return bool(getattr(AutoTokenizer.from_pretrained(_check_hf_dir(hf_dir)), "chat_template",
                        None))


def _load(hf_dir: str | Path):
    """(model, tokenizer, device): a ModelOpt export dequantized (pare_nemo.quantize)."""
    from transformers import AutoTokenizer

    from pare_nemo.quantize import load_causal_lm

    path = _check_hf_dir(hf_dir)
    device, dtype = _device_dtype()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = load_causal_lm(path, dtype if dtype == "auto" else getattr(torch, dtype))
    model = model.to(device).eval()
    return model, tok, device


def _encode(tok, prompts: list[str], chat: bool, device: str):
    """Left-padded batch of prompts, each in the chat template as a user turn when ``chat``."""
    if chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in prompts]
        return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    return tok(prompts, return_tensors="pt", padding=True).to(device)


# ---------------------------------------------------------------- downstream tasks


@functools.lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], defaults: bool, metadata: str = "{}"):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults,
                       metadata=json.loads(metadata) or None)


def task_manager(names: list[str], include_path: str | list[str] | None = None,
                 metadata: dict | None = None):
    """lm-eval's TaskManager over Pare's tasks (pare_nemo/tasks/), ``include_path``'s and lm-eval's
    own; when every name is one of the first two's, lm-eval's ~15k built-in task configs are not
    indexed (that takes ~15-30 s on a CPU). Built once per process and ``metadata`` (what tasks
    that make their own data read: RULER's ``pretrained`` tokenizer and ``max_seq_lengths``)."""
    meta = json.dumps(metadata or {}, sort_keys=True)
    extra = [include_path] if isinstance(include_path, str) else list(include_path or [])
    for p in extra:
        if not Path(p).expanduser().is_dir():
            raise FileNotFoundError(f"include_path {p} is not a directory of lm-eval task YAMLs")
    paths = (str(TASK_DIR), *(str(Path(p).expanduser()) for p in extra))
    if names and not any(c in n for n in names for c in "*?["):
        local = _task_manager(paths, False, meta)
        if all(n in local.all_tasks for n in names):
            return local
    return _task_manager(paths, True, meta)


def check_tasks(names: list[str], manager) -> None:
    """Refuse task names (glob patterns allowed) that lm-eval does not know, before any model
    loads, saying how to list the known ones."""
    if not names:
        raise UnknownTaskError(f"no task given; list the available tasks with: {LIST_TASKS}")
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        hint = "; ".join(f"{n!r}: did you mean {', '.join(h)}?" for n, h in hints.items() if h)
        raise UnknownTaskError(
            f"unknown lm-eval task(s) {unknown}{' (' + hint + ')' if hint else ''}. List the "
            f"available tasks with: {LIST_TASKS}")


def run_tasks(hf_dir: str, tasks: str | list[str], num_fewshot: int | None = None,
              batch_size: int | str = "auto", limit: int | None = None,
              apply_chat_template: bool | None = None, include_path: str | None = None,
              seed: int = 1234, max_seq_lengths: list[int] | None = None) -> dict[str, float]:
    """Downstream tasks of an exported HF model through lm-evaluation-harness (its HFLM model):
    ``tasks`` comma-separated or a list (lm-eval names or globs, Pare's ``pare_pydoc``);
    ``num_fewshot`` None keeps each task's own; ``apply_chat_template`` None applies the chat
    template when the tokenizer has one (multi-turn few-shot then); ``limit`` caps the documents
    per task (tests, smoke runs). Returns {"task/metric": value}, standard errors included as
    "task/metric_stderr"; metrics of a non-default filter read "task/metric,filter".
    Tasks that build their own prompts (RULER: ``niah_single_1``, ``ruler_vt``, …) are sized with
    the model's tokenizer, at ``max_seq_lengths`` (RULER's default: 4096)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)
             if t.strip()]
    meta = {"pretrained": str(Path(hf_dir).expanduser())} | (
        {"max_seq_lengths": list(max_seq_lengths)} if max_seq_lengths else {})
    manager = task_manager(names, include_path, meta)
    check_tasks(names, manager)
    path = _check_hf_dir(hf_dir)
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot} must be >= 0")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or none: every document)")
    chat = has_chat_template(path) if apply_chat_template is None else apply_chat_template
    device, dtype = _device_dtype()
    from pare_nemo.quantize import quant_algo

    if quant_algo(path):  # transformers would load the raw fp8/int8 numbers: pass the model
        model, tok, _ = _load(path)
        lm = HFLM(pretrained=model, tokenizer=tok, device=device, batch_size=batch_size)
    else:
        lm = HFLM(pretrained=str(path), device=device, dtype=dtype, batch_size=batch_size)
    out = simple_evaluate(
        model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        apply_chat_template=chat, fewshot_as_multiturn=chat,
        log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed)
    scores = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            if key in ("alias", "sample_len", "sample_count") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            scores[f"{task}/{metric}" + (f",{filt}" if filt not in ("", "none") else "")] = \
                float(value)
    return scores


# ---------------------------------------------------------------- generation


def _generate(model, tok, batch, max_new_tokens: int, exact: bool):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                              min_new_tokens=max_new_tokens if exact else None,
                              pad_token_id=tok.pad_token_id, temperature=None, top_p=None,
                              top_k=None)


def generation_speed(hf_dir: str, prompts: list[str], max_new_tokens: int = 64,
                     batch_sizes: tuple[int, ...] = (1, 8),
                     chat_template: bool | None = None) -> dict:
    """Greedy generation speed with transformers: for each batch size, the prompts (cycled to fill
    whole batches, at least one) in left-padded batches, each request generating exactly
    ``max_new_tokens`` tokens (EOS suppressed, so every model does the same work). Returns
    {"device", "dtype", "max_new_tokens", "chat_template", "runs": [{"batch_size", "requests",
    "tokens_per_s", "latency_s"}]}: tokens/s of all requests together, latency = mean wall time of
    one request (its batch's)."""
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if max_new_tokens < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_sizes={batch_sizes} must be "
                         ">= 1")
    model, tok, device = _load(hf_dir)
    chat = bool(getattr(tok, "chat_template", None)) if chat_template is None else chat_template
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    _generate(model, tok, _encode(tok, prompts[:1], chat, device), 2, True)  # warm-up
    runs = []
    for b in batch_sizes:
        n = -(-max(len(prompts), b) // b) * b
        requests = [prompts[i % len(prompts)] for i in range(n)]
        elapsed, new_tokens, batches = 0.0, 0, 0
        for i in range(0, n, b):
            batch = _encode(tok, requests[i:i + b], chat, device)
            sync()
            t0 = time.perf_counter()
            out = _generate(model, tok, batch, max_new_tokens, True)
            sync()
            elapsed += time.perf_counter() - t0
            new_tokens += (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
            batches += 1
        runs.append({"batch_size": b, "requests": n, "tokens_per_s": new_tokens / elapsed,
                     "latency_s": elapsed / batches})
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"device": device, "dtype": dtype, "max_new_tokens": max_new_tokens,
            "chat_template": chat, "prompts": len(prompts), "runs": runs}


def sample_generations(hf_dir: str, prompts: list[str], max_new_tokens: int = 64,
                       chat_template: bool | None = None) -> list[str]:
    """Greedy continuations of each prompt (one at a time, so no padding), the chat template
    applied when the tokenizer has one (or as ``chat_template`` says); the new text only."""
    if not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    model, tok, device = _load(hf_dir)
    chat = bool(getattr(tok, "chat_template", None)) if chat_template is None else chat_template
    outs = []
    for p in prompts:
        batch = _encode(tok, [p], chat, device)
        ids = _generate(model, tok, batch, max_new_tokens, False)[0, batch["input_ids"].shape[1]:]
        outs.append(tok.decode(ids, skip_special_tokens=True).strip())
    return outs


# ---------------------------------------------------------------- the report


def _count(n) -> str:
    return "–" if n is None else f"{int(n):,}"


def _num(x, fmt: str = ".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ratio(x, ref, fmt: str = ".0%") -> str:
    if x is None or ref in (None, 0):
        return "–"
    return format(x / ref, fmt)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _speed(r: dict) -> dict[int, dict]:
    return {run["batch_size"]: run for run in (r.get("speed") or {}).get("runs", [])}


def _check_results(results: list[dict], teacher: str | None) -> int:
    if not results or not all(isinstance(r, dict) and r.get("name") for r in results):
        raise ValueError("results must be a non-empty list of dicts, each with a 'name'")
    names = [r["name"] for r in results]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"checkpoint names {dup} appear more than once in the results")
    if teacher is None:
        return 0
    if teacher not in names:
        raise ValueError(f"teacher {teacher!r} is not among the results {names}")
    return names.index(teacher)


def _markdown(results: list[dict], t: dict, prompts: list[str] | None) -> str:
    names = [r["name"] for r in results]
    lines = ["# Compression report", "",
             f"Teacher: **{t['name']}** (every relative number is against it). "
             f"Checkpoints: {', '.join(names)}.", ""]
    fp = t.get("tokenizer")
    differ = [r["name"] for r in results if r.get("tokenizer") and fp and r["tokenizer"] != fp]
    if differ:
        lines += [f"**Tokenizers differ**: {', '.join(differ)} use another tokenizer than "
                  f"{t['name']}: loss and perplexity are per token of different vocabularies and "
                  "are not comparable across them; task scores and generations are.", ""]
    r0 = results[0]
    if r0.get("data"):
        lines += [f"Loss: held-out next-token loss on {r0.get('num_samples', '?')} x "
                  f"{r0.get('seq_length', '?')} tokens of `{r0['data']}` "
                  f"({_count(r0.get('tokens'))} predicted tokens).", ""]

    lines += ["## Size and loss", "",
              "| checkpoint | kind | params | of teacher | non-embedding params | of teacher "
              "| sparsity | bits | loss | Δ loss | perplexity | × teacher |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        dl = None if r.get("loss") is None or t.get("loss") is None else r["loss"] - t["loss"]
        lines.append(
            f"| {_cell(r['name'])} | {r.get('kind', '–')} | {_count(r.get('params'))} | "
            f"{_ratio(r.get('params'), t.get('params'))} | "
            f"{_count(r.get('non_embedding_params'))} | "
            f"{_ratio(r.get('non_embedding_params'), t.get('non_embedding_params'))} | "
            f"{_num(r.get('sparsity'), '.0%')} | {r.get('bits', '–')} | {_num(r.get('loss'))} | {_num(dl, '+.4f')} | {_num(r.get('ppl'), '.2f')} | "
            f"{_ratio(r.get('ppl'), t.get('ppl'), '.2f')} |")
    lines.append("")

    pos = [r for r in results if r.get("by_position")]
    if pos:
        b = pos[0]["by_position"]
        w = b["bucket"]
        lines += ["## Loss by position", "",
                  f"Held-out loss of the tokens at each position of documents longer than {w} "
                  f"tokens, in buckets of {w} (the smallest sliding window unless "
                  "`position_bucket=` says otherwise): past the window only full-attention layers "
                  "see the earlier tokens, so a model that lost them shows no gain there.", "",
                  "| checkpoint | " + " | ".join(f"{s}–{s + w - 1}" for s in b["start"]) + " |",
                  "|---|" + "---:|" * len(b["start"])]
        for r in pos:
            lines.append(f"| {_cell(r['name'])} | "
                         + " | ".join(_num(v) for v in r["by_position"]["loss"]) + " |")
        lines += ["", "Tokens per bucket: " + ", ".join(str(n) for n in b["tokens"]) + ".", ""]

    keys = sorted({k for r in results for k in (r.get("tasks") or {})
                   if not k.endswith("_stderr") and "_stderr," not in k})
    if keys:
        lines += ["## Downstream tasks (lm-evaluation-harness)", "",
                  "Score (± standard error), and in parentheses the share of the teacher's.", "",
                  "| task / metric | " + " | ".join(_cell(n) for n in names) + " |",
                  "|---|" + "---:|" * len(names)]
        for k in keys:
            metric, _, filt = k.partition(",")
            err_key = f"{metric}_stderr" + (f",{filt}" if filt else "")
            cells = []
            for r in results:
                v, err = (r.get("tasks") or {}).get(k), (r.get("tasks") or {}).get(err_key)
                cell = _num(v)
                if v is not None and err is not None:
                    cell += f" ± {err:.4f}"
                if v is not None and r is not t:
                    cell += f" ({_ratio(v, (t.get('tasks') or {}).get(k))})"
                cells.append(cell)
            lines.append(f"| {_cell(k)} | " + " | ".join(cells) + " |")
        lines.append("")

    sizes = sorted({b for r in results for b in _speed(r)})
    if sizes:
        sp = next(r["speed"] for r in results if r.get("speed"))
        lines += ["## Generation speed", "",
                  f"Greedy decoding with transformers on {sp.get('device', '?')} "
                  f"({sp.get('dtype', '?')}), {sp.get('max_new_tokens', '?')} new tokens per "
                  f"request, the same {sp.get('prompts', '?')} prompts for every checkpoint. "
                  "Latency: wall time of one request; × teacher: speed-up of tokens/s.", "",
                  "| checkpoint | " + " | ".join(
                      f"tokens/s @ batch {b} | × teacher | latency @ batch {b} (s)"
                      for b in sizes) + " |",
                  "|---|" + "---:|---:|---:|" * len(sizes)]
        ts = _speed(t)
        for r in results:
            s = _speed(r)
            cells = []
            for b in sizes:
                run, ref = s.get(b, {}), ts.get(b, {})
                cells += [_num(run.get("tokens_per_s"), ".1f"),
                          _ratio(run.get("tokens_per_s"), ref.get("tokens_per_s"), ".2f"),
                          _num(run.get("latency_s"), ".3f")]
            lines.append(f"| {_cell(r['name'])} | " + " | ".join(cells) + " |")
        lines.append("")

    n = max((len(r.get("samples") or []) for r in results), default=0)
    if n:
        lines += ["## Sample generations", "", "Greedy, the same prompts for every checkpoint.", "",
                  "| prompt | " + " | ".join(_cell(x) for x in names) + " |",
                  "|---|" + "---|" * len(names)]
        for i in range(n):
            prompt = prompts[i] if prompts and i < len(prompts) else f"#{i + 1}"
            cells = [_cell((r.get("samples") or [])[i]) if i < len(r.get("samples") or [])
                     else "–" for r in results]
            lines.append(f"| {_cell(prompt)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![report]({REPORT_PNG})", ""]
    return "\n".join(lines)


def _figure(results: list[dict], t: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    x = list(range(len(results)))
    panels = ["size"]
    if any(r.get("loss") is not None for r in results):
        panels.append("loss")
    if any(r.get("by_position") for r in results):
        panels.append("position")
    keys = sorted({k for r in results for k in (r.get("tasks") or {}) if "_stderr" not in k})
    if keys:
        panels.append("tasks")
    sizes = sorted({b for r in results for b in _speed(r)})
    if sizes:
        panels.append("speed")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "size":
            w = 0.4
            big = max(r.get("params") or 0 for r in results) >= 1e9
            scale, unit = (1e9, "B") if big else (1e6, "M")
            ax.bar([i - w / 2 for i in x], [(r.get("params") or 0) / scale for r in results], w,
                   label="all")
            ax.bar([i + w / 2 for i in x],
                   [(r.get("non_embedding_params") or 0) / scale for r in results], w,
                   label="non-embedding")
            ax.set_title(f"parameters ({unit})")
            ax.legend(fontsize=8)
        elif panel == "loss":
            ax.bar(x, [r.get("loss") or 0 for r in results], color="tab:red")
            for i, r in enumerate(results):
                if r.get("ppl") is not None:
                    ax.annotate(f"ppl {r['ppl']:.1f}", (i, r.get("loss") or 0), ha="center",
                                va="bottom", fontsize=8)
            ax.set_title("held-out loss")
        elif panel == "position":
            for r in results:
                b = r.get("by_position")
                if b:
                    mid = [st + b["bucket"] / 2 for st in b["start"]]
                    ax.plot(mid, b["loss"], marker="o", label=r["name"])
            ax.set_xlabel("position in document")
            ax.set_title("held-out loss by position")
            ax.legend(fontsize=8)
            continue
        elif panel == "tasks":
            w = 0.8 / len(keys)
            for j, k in enumerate(keys):
                ax.bar([i - 0.4 + w * (j + 0.5) for i in x],
                       [(r.get("tasks") or {}).get(k) or 0 for r in results], w, label=k)
            ax.set_title("task scores")
            ax.legend(fontsize=7)
        else:
            w = 0.8 / len(sizes)
            for j, b in enumerate(sizes):
                ax.bar([i - 0.4 + w * (j + 0.5) for i in x],
                       [_speed(r).get(b, {}).get("tokens_per_s") or 0 for r in results], w,
                       label=f"batch {b}")
            ax.set_title("generation tokens/s")
            ax.legend(fontsize=8)
        ax.set_xticks(x, names, rotation=20, fontsize=8)
    fig.suptitle(f"Compression report (teacher: {t['name']})")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def write_report(results: list[dict], out_dir: str, teacher: str | None = None,
                 prompts: list[str] | None = None, overwrite: bool = False) -> Path:
    """Side-by-side report of the checkpoints in ``results`` (``pare eval``'s dicts, with optional
    ``tasks`` from :func:`run_tasks`, ``speed`` from :func:`generation_speed`, ``samples`` from
    :func:`sample_generations` on ``prompts``): ``out_dir``/report.md, report.png and report.json
    (the results as given), written to a temporary directory renamed at the end. ``teacher``
    names the checkpoint everything is relative to (default: the first). Returns report.md."""
    from pare_nemo.checkpoint import atomic_output_dir

    t = results[_check_results(results, teacher)]
    if prompts is not None and (not isinstance(prompts, list)
                                or not all(isinstance(p, str) for p in prompts)):
        raise ValueError("prompts must be a list of strings")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        (tmp / REPORT_MD).write_text(_markdown(results, t, prompts))
        _figure(results, t, tmp / REPORT_PNG)
        (tmp / REPORT_JSON).write_text(json.dumps(
            {"teacher": t["name"], "prompts": prompts, "results": results}, indent=2,
            default=str))
    return Path(out_dir) / REPORT_MD

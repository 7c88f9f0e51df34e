"""`padkd demo --task language`: language-model distillation on text that ships with Python (no download).

The corpus is the English documentation of CPython's `pydoc_data.topics`, split by topic into train, val and
test, in byte-level tokens (blocks of 128). A GPT teacher (3 blocks, width 96) trains first; then, paired by
seed, students (2 blocks, width 48) over the same two-stage schedule (one epoch, then one at a lower LR):
  alone        next-token cross-entropy only
  forward_kl   + token forward KL in both stages: the epoch-matched control of PAD (same stages and term,
               uniform weights)
  jsd          + generalized JSD (β = 0.5, GKD) in both stages
  pad          + forward KL in stage 1, PAD over tokens in stage 2 (a fresh variance head on the student's
               final hidden state at each token: every token's KL weighted by a learned 1/σ²)
Only the stage-2 weighting differs between forward_kl and pad. Writes results.json, report.md (a test
perplexity and bits-per-byte table with paired 95% intervals), learning curves and the "prime tokens"
figure: validation text coloured by the σ² PAD learned per token (small σ²: a token PAD trusts).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

from padkd import files
from padkd.demos import begin, command, single_thread

BLOCK = 128
TEACHER = {"name": "gpt2", "n_layer": 3, "n_embd": 96, "n_head": 4, "n_positions": BLOCK}
STUDENT = {"name": "gpt2", "n_layer": 2, "n_embd": 48, "n_head": 4, "n_positions": BLOCK}
#: A fifth of the topics is the test split (paired comparisons want it large), a twentieth selects epochs.
DATA = {"name": "python_stdlib", "source": "docs", "block_size": BLOCK, "batch_size": 16, "val_fraction": 0.05,
        "test_fraction": 0.2}
LABELS = {"alone": "student alone", "forward_kl": "forward KL (epoch-matched control)", "jsd": "JSD (β=0.5)",
          "pad": "PAD over tokens (stage 2)"}
FKL = {"name": "kd", "method": {"name": "forward_kl"}, "weight": 1.0}
JSD = {"name": "kd", "method": {"name": "jsd", "beta": 0.5}, "weight": 1.0}
PAD_FKL = {**FKL, "weighting": {"name": "pad", "head": "token"}, "embedding": "final_norm"}
TERMS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "alone": ([], []), "forward_kl": ([FKL], [FKL]), "jsd": ([JSD], [JSD]), "pad": ([FKL], [PAD_FKL])}
BASELINE = "forward_kl"


def schedule(quick: bool) -> dict[str, int]:
    return {"teacher": 1 if quick else 2, "stage1": 1, "stage2": 1}


def _common(out: Path, name: str, seed: int) -> dict[str, Any]:
    return {"name": name, "output_dir": str(out), "seed": seed, "device": "cpu", "data": dict(DATA),
            "task": {"name": "language_modeling", "token_records": 4},
            "log": {"tensorboard": False, "progress": "none", "interval": 50}}


def teacher_config(out: Path, quick: bool) -> dict[str, Any]:
    return _common(out / "teacher", "demo-language-teacher", 0) | {
        "student": {"model": TEACHER},
        "stages": [{"name": "train", "epochs": schedule(quick)["teacher"],
                    "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.01},
                    "scheduler": {"name": "cosine", "warmup_epochs": 0.2}}]}


def student_config(method: str, seed: int, out: Path, quick: bool) -> dict[str, Any]:
    """One student's run: the same data, stages and optimizer for every method."""
    epochs = schedule(quick)
    stage1, stage2 = TERMS[method]
    cfg = _common(out / f"seed{seed}" / method, f"demo-language-{method}-seed{seed}", seed) | {
        "student": {"model": STUDENT}, "records": {"splits": ["val"]},
        "stages": [
            {"name": "stage1", "epochs": epochs["stage1"], "optimizer": {"name": "adamw", "lr": 3e-3},
             "scheduler": {"name": "cosine", "warmup_epochs": 0.2}, "terms": copy.deepcopy(stage1)},
            {"name": "stage2", "epochs": epochs["stage2"], "optimizer": {"name": "adamw", "lr": 5e-4},
             "scheduler": {"name": "constant"}, "terms": copy.deepcopy(stage2)}]}
    if method != "alone":
        cfg["teacher"] = {"model": TEACHER, "checkpoint": str(out / "teacher")}
    return cfg


def run_language_demo(out: Path, seeds: int = 2, quick: bool = False, quiet: bool = False,
                      overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Train the teacher and every student over `seeds` paired seeds; write results.json and the report.
    `resume`: reuse the finished runs in `out` and continue the interrupted one. One CPU thread unless
    `--threads` says otherwise (`padkd.demos.single_thread`)."""
    with single_thread():
        return _run(Path(out), seeds, quick, quiet, overwrite, resume)


def _run(out: Path, seeds: int, quick: bool, quiet: bool, overwrite: bool, resume: bool) -> dict[str, Any]:
    say, runs, shown_seeds, start = begin("language", out, seeds, 2, quick, quiet, overwrite, resume)
    say(f"[demo] training the teacher (gpt2 {TEACHER['n_layer']}x{TEACHER['n_embd']}) on pydoc_data.topics")
    teacher = runs.train(teacher_config(out, quick))
    say(f"[demo] teacher test perplexity {teacher['last']['perplexity']:.3f}, bpb {teacher['last']['bpb']:.4f} "
        f"({time.perf_counter() - start:.0f}s)")
    results: dict[str, Any] = {"task": "language_modeling", "metric": "perplexity", "higher_is_better": False,
                               "quick": quick, "methods": list(TERMS), "labels": LABELS, "baseline": BASELINE,
                               "seeds": list(range(seeds)), "schedule": schedule(quick), "teacher": TEACHER,
                               "student": STUDENT, "teacher_test": teacher["last"], "test": {m: {} for m in TERMS}}
    for seed in range(seeds):
        for method in TERMS:
            t0 = time.perf_counter()
            final = runs.train(student_config(method, seed, out, quick))
            results["test"][method][str(seed)] = final["last"]
            say(f"[demo] seed {seed} {method:10s} test perplexity {final['last']['perplexity']:.3f} bpb "
                f"{final['last']['bpb']:.4f} ({time.perf_counter() - t0:.0f}s)")
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["reused_runs"] = runs.reused
    results["command"] = command("language", ".", shown_seeds, quick)
    files.atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    table = write_report(out, results)
    print(table)
    print(f"\nreport: {out / 'report.md'}  ({results['seconds']:.0f}s)")
    return results


def summary_table(results: dict[str, Any]) -> str:
    """Markdown: per method, mean ± sd of test perplexity and bits per byte over seeds, and the paired difference
    to the baseline with its 95% interval (negative = lower perplexity than the baseline)."""
    from padkd.report.stats import mean_std, paired_ci

    seeds = [str(s) for s in results["seeds"]]
    base = results["baseline"]
    lines = ["| student | test perplexity | test bpb | Δ ppl vs " + base + " [95% CI] | Δ bpb vs " + base
             + " [95% CI] |", "|---|---|---|---|---|"]
    for method in results["methods"]:
        cells = [results["labels"][method]]
        for key in ("perplexity", "bpb"):
            m, sd = mean_std([results["test"][method][s][key] for s in seeds])
            cells.append(f"{m:.4f} ± {sd:.4f}")
        for key in ("perplexity", "bpb"):
            if method == base:
                cells.append("—")
                continue
            mean, low, high = paired_ci([results["test"][method][s][key] for s in seeds],
                                        [results["test"][base][s][key] for s in seeds])
            cells.append(f"{mean:+.4f}" + (f" [{low:+.4f}, {high:+.4f}]" if low is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    teacher = results["teacher_test"]
    lines.append(f"| teacher | {teacher['perplexity']:.4f} | {teacher['bpb']:.4f} | | |")
    return "\n".join(lines)


def write_report(out: Path, results: dict[str, Any]) -> str:
    """report.md with the table, learning curves (curves.png) and the prime-tokens figure (prime_tokens.png)."""
    table = summary_table(results)
    curves = _curves(out, results)
    prime = _prime_tokens(out / "seed0" / "pad")
    from padkd.report.markdown import QUICK_NOTE

    text = [f"# Language-model distillation demo\n\n`{results['command']}` ({results['seconds']:.0f} s; the command "
            "runs in this report's folder). Test split of pydoc_data.topics (byte-level tokens), paired by seed; "
            "Δ = method − baseline, lower perplexity is better.\n", table, ""]
    if results.get("quick"):
        text.insert(0, f"> {QUICK_NOTE}\n")
    if curves:
        text.append("![validation perplexity per epoch](curves.png)\n")
    if prime:
        text.append("![validation text coloured by PAD's σ² per token](prime_tokens.png)\n")
    files.atomic_write_text(out / "report.md", "\n".join(text) + "\n")
    return table


def _curves(out: Path, results: dict[str, Any]) -> bool:
    """Validation perplexity after every epoch, mean over seeds, one line per student."""
    import matplotlib

    from padkd.engine.logging import read_metrics

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in results["methods"]:
        series = []
        for seed in results["seeds"]:
            events = read_metrics(out / f"seed{seed}" / method)  # capped, torn last line left out
            series.append([e["val"]["perplexity"] for e in events if e.get("event") == "epoch" and e.get("val")])
        n = min(len(s) for s in series)
        if n == 0:
            continue
        mean = [sum(s[i] for s in series) / len(series) for i in range(n)]
        ax.plot(range(1, n + 1), mean, marker="o", label=results["labels"][method])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    return True


def _prime_tokens(run: Path, columns: int = 64, rows: int = 12) -> bool:
    """The first validation sequence of the PAD run, each byte on a cell coloured by log σ² of its prediction."""
    from padkd.engine.records import read_csv

    found = sorted((run / "records").glob("1-*-val.task-rows.elements.csv"))
    if not found:
        return False
    table = read_csv(found[0])
    key = next((k for k in table if k.endswith(".log_var")), None)
    if key is None:
        return False
    picked = [i for i, s in enumerate(table["sequence"]) if s == 0][: columns * rows]
    rows = max(1, math.ceil(len(picked) / columns))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(columns * 0.16, rows * 0.3 + 0.8))
    values = [table[key][i] for i in picked]
    low, high = min(values), max(values)
    cmap = plt.get_cmap("viridis")
    for j, i in enumerate(picked):
        x, y = j % columns, rows - 1 - j // columns
        shade = (table[key][i] - low) / (high - low) if high > low else 0.5
        ax.add_patch(plt.Rectangle((x, y), 1, 1, color=cmap(shade)))
        byte = int(table["next_token"][i])
        char = chr(byte) if 32 <= byte < 127 else ("↵" if byte == 10 else "·")
        ax.text(x + 0.5, y + 0.5, char, ha="center", va="center", fontsize=7, family="monospace",
                color="white" if shade < 0.5 else "black")
    ax.set_xlim(0, columns)
    ax.set_ylim(0, rows)
    ax.axis("off")
    ax.set_title(f"PAD's learned σ² per token (dark = small σ², trusted; log σ² from {low:.2f} to {high:.2f})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(run.parents[1] / "prime_tokens.png", dpi=120)
    plt.close(fig)
    return math.isfinite(low)

"""report.json (every number), report.md (tables) and PNG plots from one report dict."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kdpipe.pipeline.config import atomic_write_text
from kdpipe.pipeline.report_keys import HEADLINE, LABELS


def _clean(x: Any) -> Any:
    """JSON has no NaN: a metric that could not be computed is null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def quality_keys(report: dict) -> list[str]:
    keys = []
    for m in report["models"]:
        keys += [k for k in m["quality"] if k not in keys]
    return keys


def headline_table(report: dict) -> str:
    """The table `kdpipe demo` prints: main metrics, retention and speed per model."""
    keys = [k for k in HEADLINE if k in quality_keys(report)]
    has_ref = any(m.get("reference") for m in report["models"])
    head = ["model", "role"] + [LABELS[k] for k in keys] + (["NLL(ref)"] if has_ref else []) + ["ROUGE-L ret. %", "p50 s", "tok/s", "speed-up"]
    rows = []
    for m in report["models"]:
        ret = m.get("retention_vs_teacher_pct", {}).get("rougeL")
        sp = m.get("speedup_vs_teacher", {}).get("p50")
        rows.append(
            [m["name"], m["role"]] + [_f(m["quality"][k]["mean"]) if k in m["quality"] else "–" for k in keys]
            + ([_f(m["reference"]["nll_ref"]["mean"]) if m.get("reference") else "–"] if has_ref else [])
            + [_f(ret, 1) if ret is not None else "100.0" if m["role"] == "teacher" else "–",
               _f(m["latency"]["p50_s"], 4), _f(m["latency"]["tokens_per_s"], 1),
               (_f(sp, 2) + "×") if sp is not None else ("1.00×" if m["role"] == "teacher" else "–")]
        )
    return _md_table(head, rows)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


SWEEP_KEYS = ("alpha", "temperature", "divergence", "jsd_beta", "tail_mode", "lr", "steps", "top_k")


def sweep_settings(report: dict) -> tuple[list[str], list[tuple[dict, str]]]:
    """The training settings that differ between the evaluated runs (a sweep), and per run model its label.

    -> (differing keys, [(model entry, "alpha=0.5 temperature=2.0 ...")]); no keys when fewer than 2 runs differ.
    """
    runs = report.get("runs") or {}
    ms = [m for m in report["models"] if m["name"] in runs and (runs[m["name"]].get("config") or {})]
    cfgs = {m["name"]: runs[m["name"]]["config"] for m in ms}
    keys = [k for k in SWEEP_KEYS if len({json.dumps(c.get(k)) for c in cfgs.values()}) > 1]
    if len(ms) < 2 or not keys:
        return [], []
    return keys, [(m, " ".join(f"{k}={cfgs[m['name']].get(k)}" for k in keys)) for m in ms]


def reference_table(report: dict, conf: int) -> list[str]:
    """Teacher-forced NLL of the references and calibration, per model (when computed)."""
    ms = [m for m in report["models"] if m.get("reference")]
    if not ms:
        return []
    ci = lambda d, n=3: f"{_f(d['mean'], n)} [{_f(d['ci_low'], n)}, {_f(d['ci_high'], n)}]"  # noqa: E731
    return [
        f"## Likelihood of the references and calibration (mean [{conf}% bootstrap CI over examples])", "",
        "Teacher-forced on the human references: NLL per target token (lower is better), expected calibration "
        "error of the next-token top-1 confidence over 15 equal-width bins (lower is better), top-1 accuracy.", "",
        _md_table(["model", "NLL(ref)", "ECE", "top-1 acc."], [
            [m["name"], ci(m["reference"]["nll_ref"]), ci(m["reference"]["ece"], 4), _f(m["reference"].get("top1_accuracy"))]
            for m in ms
        ]), "",
    ]


def sweep_table(report: dict, conf: int) -> list[str]:
    keys, rows = sweep_settings(report)
    if not keys:
        return []
    has_ref = any(m.get("reference") for m, _ in rows)
    head = ["run", *keys, f"ROUGE-L [{conf}% CI]"] + (["NLL(ref)"] if has_ref else [])
    table = []
    for m, _ in sorted(rows, key=lambda r: -r[0]["quality"]["rougeL"]["mean"]):
        cfg = report["runs"][m["name"]]["config"]
        q = m["quality"]["rougeL"]
        table.append([m["name"], *[str(cfg.get(k)) for k in keys], f"{_f(q['mean'])} [{_f(q['ci_low'])}, {_f(q['ci_high'])}]"]
                     + ([_f(m["reference"]["nll_ref"]["mean"])] if has_ref and m.get("reference") else ["–"] if has_ref else []))
    return ["## Quality by setting (runs sorted by ROUGE-L)", "", _md_table(head, table), ""]


def markdown(report: dict, plots: list[str]) -> str:
    keys = quality_keys(report)
    conf = int(round(100 * report["scorers"]["bootstrap"]["confidence"]))
    parts = [
        "# kdpipe evaluation report",
        "",
        f"Data: `{report['data']['path']}` ({report['data'].get('selection') or 'split ' + repr(report['data']['split'])}, "
        f"{report['data']['num_examples']} examples). "
        f"Teacher: **{report['teacher']}**" + (f"; CE-only baseline: **{report['baseline']}**." if report["baseline"] else "."),
        "",
        "## Headline",
        "",
        headline_table(report),
        "",
        f"## Quality (mean [{conf}% bootstrap CI])",
        "",
        _md_table(["model"] + [LABELS.get(k, k) for k in keys], [
            [m["name"]] + [
                f"{_f(q['mean'])} [{_f(q['ci_low'])}, {_f(q['ci_high'])}]" if (q := m["quality"].get(k)) else "–"
                for k in keys
            ] for m in report["models"]
        ]),
        "",
    ]
    if report["scorers"]["nli"] is None:
        parts += ["NLI consistency: not computed (no `--nli-model` given).", ""]
    if report["scorers"]["similarity"] is None:
        parts += ["Semantic similarity: not computed (`--similarity-model none`).", ""]
    for m in report["models"]:
        if m.get("outputs_from_cache"):
            c = m["outputs_from_cache"]
            parts += [f"{m['name']}: all {c['rows']} outputs and latencies come from the teacher cache "
                      f"(`{c['file']}`, an earlier evaluation with the same model, prompts and settings).", ""]
    parts += [
        "## Latency (per request, one request at a time, same engine settings)",
        "",
        _md_table(["model", "requests", "p50 s", "p95 s", "mean s", "output tok/s", "mean output tokens", "speed-up p50", "speed-up tok/s"], [
            [m["name"], str(m["latency"]["requests"]), _f(m["latency"]["p50_s"], 4), _f(m["latency"]["p95_s"], 4),
             _f(m["latency"]["mean_s"], 4), _f(m["latency"]["tokens_per_s"], 1), _f(m["latency"]["mean_output_tokens"], 1),
             _f(m.get("speedup_vs_teacher", {}).get("p50"), 2), _f(m.get("speedup_vs_teacher", {}).get("tokens_per_s"), 2)]
            for m in report["models"]
        ]),
        "",
        "## Retention (% of the teacher)",
        "",
        _md_table(["model"] + [LABELS.get(k, k) for k in keys], [
            [m["name"]] + [_f(m["retention_vs_teacher_pct"].get(k), 1) for k in keys]
            for m in report["models"] if "retention_vs_teacher_pct" in m
        ]),
        "",
    ]
    vs = [m for m in report["models"] if "vs_baseline" in m]
    parts += ["## Against the CE-only baseline", ""]
    if vs:
        parts += [
            _md_table(["model", "metric", "student − baseline", f"{conf}% CI (paired)", "% of baseline"], [
                [m["name"], LABELS.get(k, k), _f(d, 4),
                 f"[{_f(m['vs_baseline']['difference_ci'][k]['ci_low'], 4)}, {_f(m['vs_baseline']['difference_ci'][k]['ci_high'], 4)}]",
                 _f(m["vs_baseline"]["pct_of_baseline"].get(k), 1)]
                for m in vs for k, d in m["vs_baseline"]["difference"].items()
            ]),
            "",
        ]
    else:
        parts += ["No baseline given (`--baseline NAME`).", ""]
    parts += reference_table(report, conf) + sweep_table(report, conf)
    parts += ["## Stores and runs", ""]
    if report["stores"]:
        parts += [_md_table(["store", "cache key", "sequences", "target tokens"], [
            [f"`{s['path']}`", f"`{s.get('cache_key')}`", str(s.get("num_sequences", "–")), str(s.get("num_target_tokens", "–"))]
            for s in report["stores"]
        ]), ""]
    else:
        parts += ["No stores recorded (pass `--store` or evaluate training runs).", ""]
    for name, r in report["runs"].items():
        cfg = r.get("config") or {}
        brief = ", ".join(f"{k}={cfg[k]}" for k in ("alpha", "temperature", "divergence", "steps", "lr", "seed") if k in cfg)
        parts.append(f"- run **{name}**: `{r['path']}`" + (f" ({brief})" if brief else ""))
    if report["runs"]:
        parts.append("")
    if plots:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(parts)


def plot_all(report: dict, out: Path) -> list[str]:
    """metrics.png (means with CIs), latency.png (per-request distribution), loss.png (training curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    models = report["models"]
    keys = [k for k in quality_keys(report) if all(k in m["quality"] for m in models)]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys) * max(1, len(models)) / 2), 4))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(keys))
    for i, m in enumerate(models):
        mean = np.array([m["quality"][k]["mean"] for k in keys], dtype=float)
        lo = np.array([m["quality"][k]["ci_low"] for k in keys], dtype=float)
        hi = np.array([m["quality"][k]["ci_high"] for k in keys], dtype=float)
        ax.bar(x + i * width, mean, width, yerr=[mean - lo, hi - mean], capsize=3, label=f"{m['name']} ({m['role']})")
    ax.set_xticks(x + width * (len(models) - 1) / 2, [LABELS.get(k, k) for k in keys], rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_title("Quality by model (mean, bootstrap CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)
    written.append("metrics.png")

    lat = [(m["name"], [1000 * v for v in m["latency"].get("per_request_s", [])]) for m in models]
    if any(v for _, v in lat):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.boxplot([v for _, v in lat], showfliers=True)
        ax.set_xticks(range(1, len(lat) + 1), [n for n, _ in lat])
        ax.set_ylabel("latency per request (ms)")
        ax.set_title("Per-request latency")
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
        written.append("latency.png")

    curves = {name: r["curve"] for name, r in report["runs"].items() if r.get("curve")}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        colors: dict[tuple[str, str], Any] = {}
        with_val = False
        for name, curve in curves.items():
            # Training parts first, so each validation curve (val_<part>, dashed with markers) takes its colour.
            for k, pts in sorted(curve.items(), key=lambda kv: kv[0].startswith("val_")):
                arr = np.asarray(pts, dtype=float)
                val = k.startswith("val_")
                with_val = with_val or val
                part = k[4:] if val else k
                style = {"linestyle": "--", "marker": "o", "markersize": 3} if val else {}
                if (name, part) in colors:
                    style["color"] = colors[(name, part)]
                (line,) = ax.plot(arr[:, 0], arr[:, 1], label=f"{name}: {'validation ' + part if val else k}",
                                  linewidth=1, **style)
                colors.setdefault((name, part), line.get_color())
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss per target token")
        ax.set_title("Training and validation loss" if with_val else "Training loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
        written.append("loss.png")

    keys, rows = sweep_settings(report)
    if keys:  # quality by setting: one bar per run, ROUGE-L with its CI, the teacher as a line
        rows = sorted(rows, key=lambda r: r[1])
        mean = np.array([m["quality"]["rougeL"]["mean"] for m, _ in rows], dtype=float)
        lo = np.array([m["quality"]["rougeL"]["ci_low"] for m, _ in rows], dtype=float)
        hi = np.array([m["quality"]["rougeL"]["ci_high"] for m, _ in rows], dtype=float)
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
        ax.bar(np.arange(len(rows)), mean, 0.7, yerr=[mean - lo, hi - mean], capsize=3)
        teacher = next((m for m in models if m["role"] == "teacher" and m["name"] not in {r[0]["name"] for r in rows}), None)
        if teacher is not None:
            ax.axhline(teacher["quality"]["rougeL"]["mean"], color="k", linestyle="--", linewidth=1, label=f"teacher {teacher['name']}")
            ax.legend(fontsize=8)
        ax.set_xticks(np.arange(len(rows)), [label.replace(" ", "\n") for _, label in rows], fontsize=7)
        ax.set_ylabel("ROUGE-L (mean, bootstrap CI)")
        ax.set_title("Quality by setting")
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=100)
        plt.close(fig)
        written.append("sweep.png")
    return written


def write_report(report: dict, out: Path, plots: bool = True) -> None:
    out = Path(out)
    names = plot_all(report, out) if plots else []
    report["plots"] = names
    atomic_write_text(out / "report.json", json.dumps(_clean(report), indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "report.md", markdown(report, names))

"""The demo's report: one folder to open after `make demo`, to see what the run did and whether the
policy got better or only learned to please the reward model.

    index = write_report(report, DEMO / "report")   # the dict the demo collected
    problems = check_report(DEMO / "report")        # [] when complete (the integration test)

1. `report.json`: the dict as given (indented, sorted keys), plus "figures": the PNGs written.
2. Five PNG charts (matplotlib's Agg canvas, no display): reward-model score against the
   annotator's gold score, KL against its budget, the reward model's held-out accuracy through its
   refreshes, feedback events over time, and the final win rates with their 95% intervals.
3. `index.html`: one self-contained page (figures as data: URIs, inline CSS, no scripts, nothing
   fetched) with the headline, the key numbers, the figures, the per-step status and five prompts
   answered before (SFT policy) and after (final policy). All report text is HTML-escaped.

A part the run did not produce (no refresh, no steps) gives a chart that says "no data", never an
error: the report of a failed run is the one most worth reading.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
from collections.abc import Iterable
from pathlib import Path

REQUIRED_KEYS = (
    "win_rate_vs_sft",
    "win_rate_vs_sft_ci_low",
    "win_rate_vs_base",
    "kl_to_reference",
    "kl_budget",
    "reward_model_versions",
    "wall_s",
    "preset",
    "seed",
)
_CAPTIONS = {
    "reward_gold.png": "Mean reward-model and annotator (gold) score of each step's rollouts;"
    " dashed: the reward model was swapped.",
    "kl.png": "KL of the policy to the reference per step, the KL coefficient, and the budget.",
    "reward_model_accuracy.png": "Held-out pairwise accuracy: stage 2, then each refresh's"
    " candidate before and after training; only a candidate that did not drop is published.",
    "feedback.png": "Feedback events through the gateway, cumulative per kind.",
    "win_rates.png": "Final policy's win rate by the annotator, with 95% intervals.",
}
FIGURES = tuple(_CAPTIONS)
EXAMPLES_SHOWN = 5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_FIGSIZE = (6.4, 3.6)  # inches; at _DPI a 640x360 image
_DPI = 100
_REWARD, _GOLD = "tab:blue", "tab:orange"


def status_line(step: dict, of: int | None = None) -> str:
    """One RL step for the console:
    `rl step 3/20  weights v4  reward-model v2  reward +0.123  gold 0.712  kl 1.234`."""
    number = f"{step.get('step', '?')}" + (f"/{of}" if of is not None else "")
    return "  ".join(
        [
            f"rl step {number}",
            f"weights v{step.get('weights_version', '?')}",
            f"reward-model v{step.get('reward_model_version', '?')}",
            f"reward {_fmt(step.get('reward_mean'), '+.3f')}",
            f"gold {_fmt(step.get('gold_mean'), '.3f')}",
            f"kl {_fmt(step.get('kl'), '.3f')}",
        ]
    )


def reward_model_changes(steps: list[dict]) -> list[tuple[int, int]]:
    """(step, new version) at each step scored by a different reward model than the step before."""
    return [
        (step.get("step", i + 2), step.get("reward_model_version"))
        for i, (previous, step) in enumerate(itertools.pairwise(steps))
        if step.get("reward_model_version") != previous.get("reward_model_version")
    ]


def feedback_counts(events: list[dict]) -> dict[str, tuple[list[float], list[int]]]:
    """Per kind, the event times in order and the cumulative count after each."""
    times: dict[str, list[float]] = {}
    for event in sorted(events, key=lambda e: _num(e.get("t_s"))):
        times.setdefault(str(event.get("kind", "?")), []).append(_num(event.get("t_s")))
    return {kind: (ts, list(range(1, len(ts) + 1))) for kind, ts in sorted(times.items())}


def write_report(report: dict, folder: Path) -> Path:
    """Write report.json, the five figures and index.html into `folder`; return index.html."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # 2. figures first, so that report.json lists only what exists
    for name, draw in zip(FIGURES, _CHARTS, strict=True):
        _save_chart(draw, report, folder / name)
    # 1. the data; default=str keeps a stray Path or datetime from losing a whole run's numbers
    document = {**report, "figures": list(FIGURES)}
    text = json.dumps(document, indent=2, sort_keys=True, default=str)
    (folder / "report.json").write_text(text, encoding="utf-8")
    # 3. the page
    index = folder / "index.html"
    pngs = {name: (folder / name).read_bytes() for name in FIGURES}
    index.write_text(_page(report, pngs), encoding="utf-8")
    return index


def check_report(folder: Path) -> list[str]:
    """What a complete report in `folder` lacks: files, keys, figures not embedded in the page."""
    folder = Path(folder)
    problems: list[str] = []
    try:
        document = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append("missing file report.json")
        document = {}
    except json.JSONDecodeError as error:
        problems.append(f"report.json is not JSON: {error}")
        document = {}
    problems += [f"report.json lacks key {key!r}" for key in REQUIRED_KEYS if key not in document]
    if document and sorted(document.get("figures") or []) != sorted(FIGURES):
        problems.append(f"report.json lists figures {document.get('figures')}, not {FIGURES}")
    index = folder / "index.html"
    page = index.read_text(encoding="utf-8") if index.exists() else ""
    if not page:
        problems.append("missing file index.html")
    for name in FIGURES:
        path = folder / name
        if not path.exists():
            problems.append(f"missing file {name}")
            continue
        png = path.read_bytes()
        if not png.startswith(PNG_MAGIC):
            problems.append(f"{name} is not a PNG")
        elif page and _data_uri(png) not in page:
            problems.append(f"{name} is not embedded in index.html")
    return problems


# --- charts: each draws one report part on an empty Figure, or says "no data" ------------------


def _save_chart(draw, report: dict, path: Path) -> None:
    # A bare Figure on the Agg canvas, not pyplot: no global figure registry to leak into and no
    # backend switch for whoever imports this. matplotlib is imported here because only the demo
    # draws; status_line and check_report work without it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure.add_subplot(), report)
    figure.savefig(path, dpi=_DPI, format="png")


def _no_data(ax, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _reward_gold_chart(ax, report: dict) -> None:
    title = "Reward model vs annotator (gold)\nreward up while gold falls = reward hacking"
    steps = report.get("steps") or []
    if not steps:
        return _no_data(ax, title)
    x = [_num(step.get("step", i + 1)) for i, step in enumerate(steps)]
    ax.set_title(title, fontsize=10)
    reward, gold = ([_num(s.get(key)) for s in steps] for key in ("reward_mean", "gold_mean"))
    (reward_line,) = ax.plot(x, reward, color=_REWARD, marker=".", label="reward model")
    ax.set_xlabel("RL step")
    ax.locator_params(axis="x", integer=True)
    ax.set_ylabel("reward-model score", color=_REWARD)
    gold_ax = ax.twinx()
    (gold_line,) = gold_ax.plot(x, gold, color=_GOLD, marker=".", label="annotator (gold)")
    gold_ax.set_ylabel("annotator (gold) score", color=_GOLD)
    handles = [reward_line, gold_line]
    for i, (step, version) in enumerate(reward_model_changes(steps)):
        changed = ax.axvline(
            _num(step), color="grey", linestyle="--", linewidth=1, label="reward model changed"
        )
        ax.text(_num(step), 0.98, f" v{version}", transform=ax.get_xaxis_transform(), va="top")
        if i == 0:
            handles.append(changed)
    _legend_below(ax, handles)


def _kl_chart(ax, report: dict) -> None:
    title = "KL to the reference and its coefficient"
    steps = report.get("steps") or []
    if not steps:
        return _no_data(ax, title)
    x = [_num(step.get("step", i + 1)) for i, step in enumerate(steps)]
    ax.set_title(title, fontsize=10)
    ax.plot(x, [_num(s.get("kl")) for s in steps], color=_REWARD, marker=".", label="KL")
    if report.get("kl_budget") is not None:
        ax.axhline(_num(report["kl_budget"]), color="red", linestyle=":", label="KL budget")
    ax.set_xlabel("RL step")
    ax.locator_params(axis="x", integer=True)
    ax.set_ylabel("KL to reference", color=_REWARD)
    coef_ax = ax.twinx()
    coef_ax.plot(x, [_num(s.get("kl_coef")) for s in steps], color=_GOLD, label="KL coefficient")
    coef_ax.set_ylabel("KL coefficient", color=_GOLD)
    _legend_below(ax, ax.get_lines() + coef_ax.get_lines())


def _accuracy_chart(ax, report: dict) -> None:
    title = "Reward model held-out pairwise accuracy"
    stage2 = (report.get("stages") or {}).get("reward", {}).get("held_out_accuracy")
    refreshes = report.get("refreshes") or []
    if stage2 is None and not refreshes:
        return _no_data(ax, title)
    ax.set_title(title, fontsize=10)
    labels = ["stage 2"] + [
        f"v{r.get('version', '?')}\n{_num(r.get('t_s')):.0f} s" for r in refreshes
    ]
    if stage2 is not None:
        ax.plot([0], [_num(stage2)], "s", color="black", label="stage 2")
    for i, refresh in enumerate(refreshes, start=1):
        before, after = _num(refresh.get("accuracy_before")), _num(refresh.get("accuracy_after"))
        published = bool(refresh.get("published"))
        ax.plot([i, i], [before, after], color="grey", linewidth=1)
        ax.plot([i], [before], "o", color="grey", fillstyle="none", label="before refresh")
        ax.plot(
            [i],
            [after],
            "o" if published else "x",
            color="tab:green" if published else "tab:red",
            label="after, published" if published else "after, rejected",
        )
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    _legend_once(ax)


def _feedback_chart(ax, report: dict) -> None:
    title = "Feedback events by kind"
    counts = feedback_counts(report.get("feedback") or [])
    if not counts:
        return _no_data(ax, title)
    ax.set_title(title, fontsize=10)
    end = max(times[-1] for times, _ in counts.values())
    for kind, (times, cumulative) in counts.items():
        # from zero at the start to the last event of any kind, so that the curves compare
        label = f"{kind} ({cumulative[-1]})"
        ax.step([0.0, *times, end], [0, *cumulative, cumulative[-1]], where="post", label=label)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("events (cumulative)")
    ax.locator_params(axis="y", integer=True)
    ax.legend(loc="upper left", fontsize=8)


def _win_rate_chart(ax, report: dict) -> None:
    title = "Final policy's win rate (annotator), 95% interval"
    bars = [
        (label, report.get(key), report.get(f"{key}_ci_low"), report.get(f"{key}_ci_high"))
        for label, key in (("vs SFT", "win_rate_vs_sft"), ("vs base", "win_rate_vs_base"))
        if report.get(key) is not None
    ]
    if not bars:
        return _no_data(ax, title)
    ax.set_title(title, fontsize=10)
    rates = [_num(rate) for _, rate, _, _ in bars]
    # An interval the report lacks is drawn as none, not as a fake zero-width one.
    below = [
        rate - _num(low) if low is not None else 0.0 for rate, (_, _, low, _) in zip(rates, bars)
    ]
    above = [
        _num(high) - rate if high is not None else 0.0 for rate, (_, _, _, high) in zip(rates, bars)
    ]
    positions = range(len(bars))
    ax.bar(positions, rates, yerr=[below, above], capsize=8, color=[_REWARD, _GOLD][: len(bars)])
    for x, rate in zip(positions, rates):
        ax.text(x, rate / 2, f"{rate:.0%}", ha="center", color="white", fontweight="bold")
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1, label="50%: no better")
    ax.axhline(0.7, color="tab:green", linestyle=":", linewidth=1, label="70%: goal")
    ax.set_xticks(positions, [label for label, *_ in bars])
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate")
    ax.legend(loc="upper right", fontsize=8)


_CHARTS = (_reward_gold_chart, _kl_chart, _accuracy_chart, _feedback_chart, _win_rate_chart)


def _legend_once(ax) -> None:
    """One legend entry per label, however many points share it; unlabelled lines left out."""
    by_label = {}
    for line in ax.get_lines():
        if not line.get_label().startswith("_"):
            by_label.setdefault(line.get_label(), line)
    ax.legend(by_label.values(), by_label.keys(), loc="lower right", fontsize=8)


def _legend_below(ax, handles) -> None:
    """Under the chart: with two y-axes no corner is sure to be free of lines."""
    ax.figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)


# --- the page ------------------------------------------------------------------------------------

_HEADLINE = ("preset", "seed", "algorithm", "annotator")
_STEP_COLUMNS = ("step", "t (s)", "weights", "reward model", "reward", "gold", "KL", "KL coef")
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em;
       color: #222; }
h1 { margin-bottom: 0.2em; } .headline { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } img { max-width: 100%; border: 1px solid #eee; }
pre { white-space: pre-wrap; margin: 0; font-family: inherit; }
"""


def _page(report: dict, pngs: dict[str, bytes]) -> str:
    headline = ", ".join(
        [f"{key} <b>{_e(report.get(key, '?'))}</b>" for key in _HEADLINE]
        + [f"wall time <b>{_e(_duration(report.get('wall_s')))}</b>"]
    )
    figures = "\n".join(
        f'<figure><img alt="{_e(name)}" src="{_data_uri(png)}"><figcaption>{_e(_CAPTIONS[name])}</figcaption></figure>'
        for name, png in pngs.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>RLHF demo report</title>
<style>{_CSS}</style></head>
<body>
<h1>RLHF demo report</h1>
<p class="headline">{headline}</p>
<h2>Key numbers</h2>
{_table(["", "value"], _key_numbers(report))}
<h2>Figures</h2>
<div class="figures">
{figures}
</div>
<h2>RL steps</h2>
{_steps_table(report.get("steps") or [])}
<h2>Five prompts, answered before (SFT policy) and after (final policy)</h2>
{_examples_table(report.get("examples") or [])}
</body></html>
"""


def _key_numbers(report: dict) -> list[list[str]]:
    stages = report.get("stages") or {}
    sft, reward = stages.get("sft") or {}, stages.get("reward") or {}
    kl, budget = report.get("kl_to_reference"), report.get("kl_budget")
    within = "" if kl is None or budget is None else " (over)" if kl > budget else " (within)"
    versions = report.get("reward_model_versions") or []
    return [
        ["win rate vs SFT", _win_rate(report, "vs_sft")],
        ["win rate vs base", _win_rate(report, "vs_base")],
        ["KL to reference / budget", f"{_fmt(kl, '.2f')} / {_fmt(budget, '.2f')}{within}"],
        ["reward-model versions used", ", ".join(f"v{v}" for v in versions) or "n/a"],
        [
            "SFT held-out loss before → after",
            f"{_fmt(sft.get('eval_loss_before'), '.3f')} → {_fmt(sft.get('eval_loss_after'), '.3f')}",
        ],
        [
            "reward model stage-2 held-out accuracy",
            f"{_fmt(reward.get('held_out_accuracy'), '.1%')} ({_fmt(reward.get('pairs'), 'd')}"
            + f" pairs from {_fmt(reward.get('rankings'), 'd')} rankings)",
        ],
        [
            "stage times",
            ", ".join(
                f"{name} {_duration((part or {}).get('seconds'))}" for name, part in stages.items()
            )
            or "n/a",
        ],
    ]


def _win_rate(report: dict, against: str) -> str:
    rate = report.get(f"win_rate_{against}")
    low, high = report.get(f"win_rate_{against}_ci_low"), report.get(f"win_rate_{against}_ci_high")
    text = f"{_fmt(rate, '.1%')} (95% CI {_fmt(low, '.1%')} – {_fmt(high, '.1%')})"
    metrics = (report.get(f"eval_{against}") or {}).get("metrics") or {}
    if "n" in metrics:
        text += (
            f"; n {metrics['n']}: {metrics.get('wins', '?')} wins, {metrics.get('losses', '?')} losses,"
            f" {metrics.get('ties', '?')} ties"
        )
    return text


def _steps_table(steps: list[dict]) -> str:
    if not steps:
        return "<p>no data</p>"
    rows = [
        [
            _fmt(s.get("step"), ""),
            _fmt(s.get("t_s"), ".0f"),
            _version(s.get("weights_version")),
            _version(s.get("reward_model_version")),
            _fmt(s.get("reward_mean"), "+.3f"),
            _fmt(s.get("gold_mean"), ".3f"),
            _fmt(s.get("kl"), ".3f"),
            _fmt(s.get("kl_coef"), ".4f"),
            _fmt(s.get("rollouts"), ""),
        ]
        for s in steps
    ]
    return _table([*_STEP_COLUMNS, "rollouts"], rows, table_id="steps", numeric=True)


def _examples_table(examples: list[dict]) -> str:
    if not examples:
        return "<p>no data</p>"
    rows = [
        [
            f"<pre>{_e(example.get('prompt', ''))}</pre>",
            f"<pre>{_e(example.get('before', ''))}</pre>",
            _fmt(example.get("before_score"), ".3f"),
            f"<pre>{_e(example.get('after', ''))}</pre>",
            _fmt(example.get("after_score"), ".3f"),
        ]
        for example in examples[:EXAMPLES_SHOWN]
    ]
    header = ["prompt", "before (SFT)", "score", "after (final)", "score"]
    return _table(header, rows, table_id="examples", escape=False)


def _table(
    header: list[str],
    rows: Iterable[list[str]],
    table_id: str = "",
    numeric: bool = False,
    escape: bool = True,
) -> str:
    """Cells are escaped unless `escape` is False (the caller escaped them, to add markup)."""
    cell = _e if escape else str
    td = '<td class="n">' if numeric else "<td>"
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"{td}{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    attribute = f' id="{_e(table_id)}"' if table_id else ""
    return f"<table{attribute}>\n<tr>{head}</tr>\n{body}\n</table>"


# --- formatting ----------------------------------------------------------------------------------


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _version(value) -> str:
    return "n/a" if value is None else f"v{value}"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value) -> float:
    """A number to plot; anything missing or not numeric is NaN, which matplotlib leaves out."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value, spec: str) -> str:
    if value is None:
        return "n/a"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "n/a"
    seconds = _num(seconds)
    if not seconds >= 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"

"""`slapgen eval`'s outputs: eval.json (everything), eval.md (the tables), report.html (the tables and
every video, systems side by side per prompt and seed). The page is one self-contained file: inline
CSS, no script, videos and figures by relative path, nothing fetched from the network.

With `--checkpoints` (the result's `checkpoints` section, `curves.summary` per run) all three name each
run's best checkpoint under `--pick-by` and its LoRA file, say whether it overfits, and tabulate every
metric by step with the best per metric marked; the curves (`curve_plots`, curves/*.png) are drawn here
and shown in report.html."""

from __future__ import annotations

import html
import json
from pathlib import Path

from slapgen.atomic import atomic_write_text
from trainer.evaluate.curves import best_sentence
from trainer.evaluate.names import HELDOUT_LOSS, TICFT_BASE_LOSSES, metric_text
from trainer.evaluate.picking import column_best


REPORT_FILES = {"json": "eval.json", "md": "eval.md", "html": "report.html"}


def write_reports(result: dict, out: Path, title: str = "slapgen eval") -> dict[str, Path]:
    """`title` heads eval.md and report.html (a sweep's combined report says it is the sweep's)."""
    out = Path(out)
    paths = {kind: out / name for kind, name in REPORT_FILES.items()}
    if "checkpoints" in result:
        from trainer.evaluate.curve_plots import write_curves  # matplotlib only when there are curves

        base = result["systems"].get("base", {}).get("metrics")
        for adapter, entry in result["checkpoints"]["runs"].items():
            entry["curves"] = write_curves(out, adapter, entry, base)
    atomic_write_text(paths["json"], json.dumps(result, indent=2) + "\n")
    atomic_write_text(paths["md"], markdown(result, title))
    atomic_write_text(paths["html"], page(result, title))
    return paths


def _number(value) -> str:
    if value is None:
        return "-"
    return metric_text(value) if isinstance(value, float) else str(value)


def _metric_header(name: str, definition: dict, objective: str | None = None) -> str:
    on = f" on {objective}" if objective else ""
    return f"{name} {'↑' if definition['higher_is_better'] else '↓'}{on}"


def _columns(result: dict) -> list[tuple[str, str | None]]:
    """The metrics table's columns, (metric, objective): one per metric, except a metric whose systems have
    different objectives (a TIC-FT adapter's held-out loss beside text-to-video ones), which gets one column per
    objective, named in its header, so no reader compares numbers of two objectives across a column."""
    columns = []
    for name, definition in result["metric_definitions"].items():
        objectives = list(dict.fromkeys(definition.get("objectives", {}).values()))
        columns += [(name, objective) for objective in objectives] if len(objectives) > 1 else [(name, None)]
    return columns


def _value(result: dict, system: str, name: str, objective: str | None):
    """`system`'s number in the column (metric, objective): its own on its objective, and base's on a TIC-FT
    objective (eval.json's `base` `heldout_loss_by_ticft_layout`, measured on that layout's cached clips)."""
    data = result["systems"][system]
    own = result["metric_definitions"][name].get("objectives", {}).get(system)
    if objective is None or own == objective:
        return data["metrics"].get(name)
    objectives = result["metric_definitions"][name]["objectives"]
    layouts = {other["ticft_layout"] for key, other in result["systems"].items()
               if other.get("ticft_layout") and objectives.get(key) == objective}
    by_layout = data.get(TICFT_BASE_LOSSES, {}) if name == HELDOUT_LOSS else {}
    return next((by_layout[layout] for layout in layouts if layout in by_layout), None)


def _best(result: dict, name: str, objective: str | None = None) -> str | None:
    values = {system: _value(result, system, name, objective) for system in result["systems"]}
    return column_best(values, result["metric_definitions"][name]["higher_is_better"])


def _win(entry: dict) -> str:
    return f"{entry['rate']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}] p={entry['sign_test_p']:.3g} (n={entry['comparisons']})"


FVD_COLUMNS = ("system", "fvd_i3d", "95% interval", "generated", "real")


def fvd_rows(result: dict) -> list[list[str]]:
    """FVD with its interval and the two sets' sizes, per system that has it: eval.md's table and report.html's."""
    return [[system, metric_text(d["value"]), f"[{metric_text(d['low'])}, {metric_text(d['high'])}]", str(d["n_a"]),
             str(d["n_b"])] for system, data in result["systems"].items() if (d := data.get("fvd_i3d_detail"))]


def ab_rows(result: dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The A/B-against-base table: every metric any system was compared on (in `metric_definitions`' order) and each
    system's cells, `-` where it has none. A checkpoint eval generates only some systems (`--generate-top`): the
    first system's metrics alone hid a later one's, and crashed the report when the first was the generated one."""
    ab = {system: data["ab_vs_base"] for system, data in result["systems"].items() if "ab_vs_base" in data}
    compared = {name for entries in ab.values() for name in entries}
    names = [name for name in result["metric_definitions"] if name in compared]
    names += sorted(compared - set(names))
    return names, [(system, [_win(entries[name]) if name in entries else "-" for name in names])
                   for system, entries in ab.items()]


def served(result: dict) -> str:
    """How the systems were run: one pipeline, or (results combined by `combine`) one per evaluation."""
    swaps = result["engine"]["adapter_swaps"]
    pipelines = result["engine"].get("pipelines", 1)
    swapped = f"{swaps} adapter swap{'s' * (swaps != 1)}"
    if pipelines == 1:
        return f"one pipeline, {swapped}"
    return f"{pipelines} evaluations, one pipeline each, same prompts, seeds and settings ({swapped})"


def ticft_base_sentences(result: dict) -> list[str]:
    """The base model's held-out loss on each TIC-FT layout, next to the systems' own: a TIC-FT adapter's
    heldout_loss is only comparable with this number (the metrics table's column of that objective holds it too)."""
    by_layout = result["systems"].get("base", {}).get(TICFT_BASE_LOSSES, {})
    sentences = []
    for layout, value in by_layout.items():
        adapters = [name for name, system in result["systems"].items() if system.get("ticft_layout") == layout]
        sentences.append(f"base@{layout}: heldout_loss {metric_text(value)}, the base model on the TIC-FT {layout} "
                         f"objective {' and '.join(adapters)} trained; compare their heldout_loss with this, not with "
                         "base's text-to-video one")
    return sentences


def notes(result: dict) -> list[str]:
    lines = [f"{sentence}." for sentence in ticft_base_sentences(result)]
    for name, definition in result["metric_definitions"].items():
        model = f" Model: {definition['model']}." if definition.get("model") else ""
        lines.append(f"{name}: {definition['what']}.{model}")
        if definition.get("text"):
            lines.append(f"{name} text: {definition['text']}.")
        if definition.get("ticft"):
            lines.append(f"{name} of TIC-FT adapters: {definition['ticft']}.")
        if definition.get("warning"):
            lines.append(f"WARNING {name}: {definition['warning']}.")
    lines.append("A/B: per prompt and seed, the system against base on the same prompt, seed and settings; win rate = "
                 "(wins + ties/2) / comparisons, 95% bootstrap interval resampling prompts, two-sided sign test on untied pairs. "
                 "With few prompts (under ~20) the bootstrap interval is too narrow (an all-loss sample gives [0, 0]); "
                 "read the sign test's p-value there.")
    return lines


def markdown(result: dict, title: str = "slapgen eval") -> str:
    columns = _columns(result)
    systems = list(result["systems"])
    lines = [f"# {title}: {result['model']} on {result['heldout']}", "",
             f"{len(result['prompts'])} held-out prompts x seeds {result['seeds']} x {len(systems)} systems; "
             f"{served(result)}.", "",
             "| system | " + " | ".join(_metric_header(m, result["metric_definitions"][m], o) for m, o in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for system in systems:
        cells = []
        for name, objective in columns:
            value = _number(_value(result, system, name, objective))
            cells.append(f"**{value}**" if _best(result, name, objective) == system and len(systems) > 1 else value)
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    fvd = fvd_rows(result)
    if fvd:
        lines += ["", "| " + " | ".join(FVD_COLUMNS) + " |", "|---" * len(FVD_COLUMNS) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in fvd]
    names, ab = ab_rows(result)
    if ab:
        lines += ["", "## A/B against base (win rate [95% interval], sign test p)", "",
                  "| system | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {s} | " + " | ".join(cells) + " |" for s, cells in ab]
    lines += checkpoint_markdown(result)
    lines += ["", "## What the numbers are", ""] + [f"- {line}" for line in notes(result)]
    lines += ["", "Seconds per video: " + ", ".join(f"{k} {v:.3g}" for k, v in result["seconds_per_video"].items()), ""]
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 12px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; font-size: 14px; }
td.best { font-weight: bold; background: #eef7ee; }
.grid { display: grid; gap: 12px; margin: 8px 0 24px; }
.cell video { width: 100%; background: #000; }
.cell .name { font-weight: bold; }
.cell .scores { font-size: 12px; color: #555; }
.caption { font-size: 14px; color: #333; max-width: 1100px; }
.warning { color: #a00; }
.curves { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0 24px; }
.curves img { max-width: 100%; width: 600px; border: 1px solid #ddd; }
"""


def page(result: dict, title: str = "slapgen eval") -> str:
    e = html.escape
    metrics = list(result["metric_definitions"])
    systems = list(result["systems"])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}: {e(result['model'])}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{e(title)}: {e(result['model'])}</h1>",
             f"<p>Held-out set {e(result['heldout'])}: {len(result['prompts'])} prompts, seeds {e(str(result['seeds']))}, "
             f"{len(systems)} systems; {e(served(result))}.</p>",
             "<h2>Metrics</h2><table id='metrics'><tr><th>system</th>"
             + "".join(f"<th>{e(_metric_header(m, result['metric_definitions'][m], o))}</th>" for m, o in _columns(result))
             + "</tr>"]
    for system in systems:
        cells = []
        for name, objective in _columns(result):
            best = " class='best'" if _best(result, name, objective) == system and len(systems) > 1 else ""
            cells.append(f"<td{best}>{e(_number(_value(result, system, name, objective)))}</td>")
        parts.append(f"<tr><td>{e(system)}</td>{''.join(cells)}</tr>")
    parts.append("</table>")
    if fvd := fvd_rows(result):  # eval.md had it and the page did not, while its notes cite the interval
        parts.append("<table id='fvd'><tr>" + "".join(f"<th>{e(c)}</th>" for c in FVD_COLUMNS) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in fvd]
        parts.append("</table>")
    names, ab = ab_rows(result)
    if ab:
        parts.append("<h2>A/B against base</h2><table id='ab'><tr><th>system</th>"
                     + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        parts += [f"<tr><td>{e(s)}</td>" + "".join(f"<td>{e(cell)}</td>" for cell in cells) + "</tr>" for s, cells in ab]
        parts.append("</table>")
    parts += checkpoint_html(result)
    parts.append("<h2>What the numbers are</h2><ul>")
    for line in notes(result):
        css = " class='warning'" if line.startswith("WARNING") else ""
        parts.append(f"<li{css}>{e(line)}</li>")
    parts.append("</ul>")
    if result["videos"]:
        parts.append("<h2>Videos</h2>")
        by_key = {(v["prompt"], v["seed"], v["system"]): v for v in result["videos"]}
        with_videos = {v["system"] for v in result["videos"]}  # --generate-top: not every checkpoint made videos
        columns = f"grid-template-columns: repeat({len(with_videos)}, minmax(160px, 1fr))"
        for prompt in result["prompts"]:
            parts.append(f"<h3>Prompt {prompt['index']} ({e(prompt['video'])})</h3><p class='caption'>{e(prompt['caption'])}</p>")
            for seed in result["seeds"]:
                parts.append(f"<div class='grid' style='{columns}'>")
                for system in systems:
                    video = by_key.get((prompt["index"], seed, system))
                    if video is None:
                        continue
                    scores = ", ".join(f"{name} {_number(video[name])}" for name in metrics if name in video)
                    parts.append(f"<div class='cell'><div class='name'>{e(system)} · seed {seed}</div>"
                                 f"<video src='{e(video['path'])}' controls loop muted playsinline preload='auto'></video>"
                                 f"<div class='scores'>{e(scores)}</div></div>")
                parts.append("</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _checkpoint_rows(entry: dict) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """The columns of one run's checkpoint table and, per step, each cell's text and whether it is that
    metric's best."""
    metrics = list(entry["metrics"])
    header = ["step", "system", *[f"{m} {'↑' if entry['higher_is_better'][m] else '↓'}" for m in metrics],
              "training loss", "videos"]
    generated = set(entry["generated"])
    rows = []
    for k, (step, system) in enumerate(zip(entry["steps"], entry["systems"])):
        cells = [(str(step), False), (system, False)]
        for metric in metrics:
            best = entry["best_per_metric"].get(metric, {}).get("system") == system
            cells.append((_number(entry["metrics"][metric][k]), best))
        cells.append((_number(entry["training_loss"][k]), False))
        cells.append(("yes" if system in generated else "no", False))
        rows.append(cells)
    return header, rows


def _checkpoint_intro(section: dict) -> str:
    top = section["generate_top"]
    if not any(entry["generated"] for entry in section["runs"].values()):
        videos = "no videos (no generation metric asked)"
    else:
        videos = f"videos on the {top} with the lowest held-out loss over every run" if top else "videos on all of them"
    return f"Every saved checkpoint of each run as a system NAME@STEP: held-out loss on all of them, {videos}"


def checkpoint_markdown(result: dict) -> list[str]:
    section = result.get("checkpoints")
    if not section:
        return []
    lines = ["", f"## Checkpoints (best by {section['pick_by']})", "", _checkpoint_intro(section) + "."]
    for adapter, entry in section["runs"].items():
        header, rows = _checkpoint_rows(entry)
        lines += ["", f"### {adapter} ({entry['run']})", "", f"**{best_sentence(adapter, entry)}**", "",
                  f"Overfitting check: {entry['overfitting']['sentence']}.", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(f"**{text}**" if best else text for text, best in row) + " |" for row in rows]
        lines += [""] + [f"![{adapter} {metric}]({path})" for metric, path in entry.get("curves", {}).items()]
    return lines


def checkpoint_html(result: dict) -> list[str]:
    section = result.get("checkpoints")
    if not section:
        return []
    e = html.escape
    parts = [f"<h2>Checkpoints (best by {e(section['pick_by'])})</h2>",
             f"<p>{e(_checkpoint_intro(section))}; the best of each metric is marked in the table and starred on its "
             "curve.</p>"]
    for adapter, entry in section["runs"].items():
        header, rows = _checkpoint_rows(entry)
        css = " class='warning'" if entry["overfitting"]["overfitting"] else ""
        parts += [f"<h3>{e(adapter)}</h3>", f"<p>Run {e(entry['run'])}</p>",
                  f"<p class='pick'><b>{e(best_sentence(adapter, entry))}</b></p>",
                  f"<p{css}>Overfitting check: {e(entry['overfitting']['sentence'])}.</p>",
                  f"<table class='checkpoints' id='checkpoints-{e(adapter)}'><tr>"
                  + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        for row in rows:
            parts.append("<tr>" + "".join(("<td class='best'>" if best else "<td>") + f"{e(text)}</td>" for text, best in row)
                         + "</tr>")
        parts.append("</table><div class='curves'>")
        parts += [f"<img src='{e(path)}' alt='{e(adapter)}: {e(metric)} by step'>" for metric, path in entry.get("curves", {}).items()]
        parts.append("</div>")
    return parts

"""report.html: one self-contained page (local PNGs, no CDN, no scripts) a person reads before
training: what the captions look like, what the clips cover, and every flagged clip with a thumbnail."""

from __future__ import annotations

import html
from pathlib import Path

from slapgen.atomic import atomic_write_text
from slapgen.errors import counted
from trainer.curate.captions import ASPECTS, CATEGORIES, MAX_WORDS, MIN_WORDS, OUTCOMES
from trainer.datasets import CURATE_PAGE


def _plots(out: Path, report: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    clips = report["clips"]
    summary = report["summary"]
    written = {}

    def save(figure, name: str, title: str) -> None:
        figure.tight_layout()
        figure.savefig(folder / f"{name}.png", dpi=96)
        plt.close(figure)
        written[name] = title

    lengths = [c["caption"]["words"] for c in clips if c["caption_text"]]  # missing or unreadable ones have none
    figure, axis = plt.subplots(figsize=(6, 3.2))
    axis.axvspan(MIN_WORDS, MAX_WORDS, color="tab:green", alpha=0.15, label=f"{MIN_WORDS}-{MAX_WORDS} words")
    axis.hist(lengths or [0], bins=range(0, max(lengths + [150]) + 5, 5), color="tab:blue")
    axis.set_xlabel("caption length (words)")
    axis.set_ylabel("clips")
    axis.legend()
    save(figure, "caption_lengths", "Caption length")

    for name, counts, title in [
        ("categories", summary["categories"], "Motion categories (clips whose caption mentions each)"),
        ("aspects", summary["aspects"], "Caption aspects covered"),
    ]:
        figure, axis = plt.subplots(figsize=(6, 3.2))
        axis.barh(list(counts), list(counts.values()), color="tab:orange")
        axis.invert_yaxis()
        axis.set_xlabel("clips")
        save(figure, name, title)

    figure, axis = plt.subplots(figsize=(6, 3.2))
    axis.hist([c["caption"]["score"] for c in clips], bins=20, range=(0, 1), color="tab:purple")
    axis.set_xlabel("caption score (0 = flagged)")
    axis.set_ylabel("clips")
    save(figure, "scores", "Caption score")
    return written


def write_html_report(out: Path, report: dict) -> Path:
    plots = _plots(out, report)
    summary = report["summary"]
    escape = html.escape
    rows = []
    for clip in report["clips"]:
        if not clip["issues"]:
            continue
        thumbnail = f'<img src="{escape(clip["thumbnail"])}" width="160" alt="">' if clip["thumbnail"] else "unreadable"
        issues = ", ".join(clip["issues"])
        if clip.get("duplicate_of"):
            issues += f" (of {clip['duplicate_of']})"
        reasons = clip["caption"].get("garbage_reasons") or []
        detail = clip["video_info"].get("error") or "; ".join(reasons)
        if clip.get("duplicate"):
            relation = clip["duplicate"]
            start, end = relation["span_in_clip_s"]
            detail = f"{relation['summary']} of {relation['of']} (its {start:.2f}-{end:.2f} s)" + (f"; {detail}" if detail else "")
        caption = clip["caption_text"] or ""
        rows.append(
            f"<tr><td>{thumbnail}</td><td>{escape(clip['video'])}</td><td>{escape(issues)}</td>"
            f"<td>{escape(detail)}</td><td class=caption>{escape(caption[:400])}</td></tr>"
        )
    counts = "".join(f"<li>{escape(code)}: {count}</li>" for code, count in summary["issues"].items())
    coverage_rows = "".join(
        f"<tr><td>{escape(kind)}</td><td>{escape(name)}</td><td>{c['clips']}</td><td>{c['clean']}</td><td>{c['selected']}</td></tr>"
        for kind, labels in summary["coverage"].items() for name, c in labels.items())
    figures = "".join(
        f'<figure><img src="plots/{name}.png" alt="{escape(title)}"><figcaption>{escape(title)}</figcaption></figure>'
        for name, title in plots.items()
    )
    unread = report.get("not_read") or []
    not_read = ("<h2>In the folder, not read</h2><table><tr><th>path</th><th>why</th></tr>" + "".join(
        f"<tr><td>{escape(entry['path'])}</td><td>{escape(entry['why'])}</td></tr>" for entry in unread) + "</table>"
                ) if unread else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slapgen curation report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; }}
td.caption {{ font-size: 0.85em; max-width: 420px; }}
</style></head><body>
<h1>Curation report</h1>
<p>Dataset <code>{escape(report["dataset"])}</code>: {counted(summary["clips"], "clip")}, {summary["clean"]} clean,
{summary["flagged"]} flagged, {summary["without_caption"]} without a caption yet.
{f'{summary["selected"]} selected into <code>selected.jsonl</code>.' if summary["requested"] else ''}
Probed at {summary["clips_per_second"]} clips/s with {summary["workers"]} workers.</p>
<h2>Issues</h2><ul>{counts or "<li>none</li>"}</ul>
<h2>Coverage per label, before and after selection</h2>
<p>{f'{summary["hard_negatives_selected"]} of the selected clips are hard negatives (miss, foul, block/absorb).' if summary["requested"] else 'No selection requested.'}</p>
<table><tr><th>labels</th><th>label</th><th>all clips</th><th>clean</th><th>selected</th></tr>{coverage_rows}</table>
<h2>Captions and coverage</h2>{figures}
<p>Categories: {escape(", ".join(CATEGORIES))}. Outcomes: {escape(", ".join(OUTCOMES))}. Aspects: {escape(", ".join(ASPECTS))}.</p>
<h2>Flagged clips</h2>
<table><tr><th>thumbnail</th><th>video</th><th>issues</th><th>detail</th><th>caption</th></tr>
{"".join(rows) or '<tr><td colspan="5">none</td></tr>'}
</table>
{not_read}</body></html>
"""
    path = out / CURATE_PAGE
    atomic_write_text(path, page)
    return path

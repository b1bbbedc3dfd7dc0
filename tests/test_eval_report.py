"""eval.md and report.html's metrics table (trainer/evaluate/report.py), from a hand-written eval result."""

from __future__ import annotations

from trainer.evaluate.report import write_reports

TICFT = "TIC-FT c1b1t1 (first-frame)"


def ticft_result() -> dict:
    """An eval of base, a text-to-video adapter and a TIC-FT adapter, as run_eval assembles it: `objectives`
    per system in heldout_loss's definition, base's loss on the TIC-FT objective in its
    `heldout_loss_by_ticft_layout`."""
    return {
        "format": 1, "model": "tiny", "heldout": "h", "seeds": [0], "generation": {}, "engine": {"adapter_swaps": 2},
        "metric_definitions": {
            "heldout_loss": {"higher_is_better": False, "what": "the training objective on the held-out clips",
                             "objective": "v_prediction",
                             "objectives": {"base": "text-to-video", "t2v": "text-to-video", "i2v": TICFT},
                             "ticft": "a TIC-FT adapter's held-out loss is its training objective"},
            "temporal_flickering": {"higher_is_better": True, "what": "1 - mean absolute frame difference"},
        },
        "systems": {
            "base": {"adapter": None, "metrics": {"heldout_loss": 0.9, "temporal_flickering": 0.95},
                     "heldout_loss_by_ticft_layout": {"c1b1t1": 0.7}},
            "t2v": {"adapter": "/runs/t2v.safetensors", "metrics": {"heldout_loss": 0.8, "temporal_flickering": 0.97}},
            "i2v": {"adapter": "/runs/i2v.safetensors", "ticft_layout": "c1b1t1",
                    "metrics": {"heldout_loss": 0.6, "temporal_flickering": 0.9}},
        },
        "prompts": [], "videos": [], "seconds_per_video": {},
    }


def test_heldout_losses_of_two_objectives_get_a_column_each_with_base_on_both(tmp_path):
    """Guards eval.md's one heldout_loss column holding a TIC-FT adapter's loss (its layout's objective) under
    the text-to-video ones, with only a note below saying not to compare them (and no best marked): each
    objective now has its own column, named in the header; base's row has its number on both (its TIC-FT
    one from `heldout_loss_by_ticft_layout`), so each column compares like with like and marks its best.
    report.html's table says the same."""
    paths = write_reports(ticft_result(), tmp_path)
    markdown = paths["md"].read_text()
    assert ("| system | heldout_loss ↓ on text-to-video | heldout_loss ↓ on TIC-FT c1b1t1 (first-frame) "
            "| temporal_flickering ↑ |") in markdown.splitlines()
    for row in ("| base | 0.9 | 0.7 | 0.95 |", "| t2v | **0.8** | - | **0.97** |", "| i2v | - | **0.6** | 0.9 |"):
        assert row in markdown.splitlines(), markdown
    page = paths["html"].read_text()
    assert ("<tr><th>system</th><th>heldout_loss ↓ on text-to-video</th><th>heldout_loss ↓ on TIC-FT c1b1t1 "
            "(first-frame)</th><th>temporal_flickering ↑</th></tr>") in page
    assert "<tr><td>base</td><td>0.9</td><td>0.7</td><td>0.95</td></tr>" in page
    assert "<tr><td>i2v</td><td>-</td><td class='best'>0.6</td><td>0.9</td></tr>" in page


def test_one_objective_keeps_one_plain_column(tmp_path):
    """The split is only for objectives that differ: text-to-video systems alone keep `heldout_loss ↓`."""
    result = ticft_result()
    del result["systems"]["i2v"]
    result["metric_definitions"]["heldout_loss"]["objectives"].pop("i2v")
    markdown = write_reports(result, tmp_path)["md"].read_text().splitlines()
    assert "| system | heldout_loss ↓ | temporal_flickering ↑ |" in markdown
    assert "| t2v | **0.8** | **0.97** |" in markdown


def _ab(rate: float) -> dict:
    return {"rate": rate, "low": rate - 0.1, "high": rate + 0.1, "sign_test_p": 0.5, "comparisons": 4}


def test_the_ab_table_has_every_metric_any_system_was_compared_on(tmp_path):
    """Guards the A/B table built from the first system's metrics only (a walk-through's find): in a checkpoint
    eval with --generate-top, the first checkpoint has only a held-out loss, so a generated one's flickering A/B was
    left out of eval.md and report.html; in the other order the report crashed (KeyError) after the whole eval. Every
    metric compared is a column, in metric_definitions' order, and a system without it shows `-`."""
    for first, second in (("early", "late"), ("late", "early")):
        result = ticft_result()
        del result["systems"]["i2v"]
        result["metric_definitions"]["heldout_loss"]["objectives"].pop("i2v")
        systems = {"early": {"adapter": "/runs/early", "metrics": {"heldout_loss": 0.8},
                             "ab_vs_base": {"heldout_loss": _ab(0.6)}},
                   "late": {"adapter": "/runs/late", "metrics": {"heldout_loss": 0.85, "temporal_flickering": 0.96},
                            "ab_vs_base": {"temporal_flickering": _ab(0.7), "heldout_loss": _ab(0.4)}}}
        result["systems"] = {"base": result["systems"]["base"], first: systems[first], second: systems[second]}
        paths = write_reports(result, tmp_path / first)
        markdown = paths["md"].read_text().splitlines()
        assert "| system | heldout_loss | temporal_flickering |" in markdown
        assert "| early | 0.60 [0.50, 0.70] p=0.5 (n=4) | - |" in markdown
        assert "| late | 0.40 [0.30, 0.50] p=0.5 (n=4) | 0.70 [0.60, 0.80] p=0.5 (n=4) |" in markdown
        page = paths["html"].read_text()
        assert ("<tr><td>early</td><td>0.60 [0.50, 0.70] p=0.5 (n=4)</td><td>-</td></tr>") in page


def test_one_swap_is_one_swap():
    """Guards "one pipeline, 1 adapter swaps" in eval.md's first line (a walk-through's find)."""
    from trainer.evaluate.report import served

    assert [served({"engine": {"adapter_swaps": n}}) for n in (1, 2)] == ["one pipeline, 1 adapter swap",
                                                                          "one pipeline, 2 adapter swaps"]


def test_report_html_has_the_fvd_table_eval_md_has(tmp_path):
    """Guards report.html without eval.md's FVD table (its interval and the two sets' sizes; a walk-through's find),
    while the page's notes say "interval: 95% bootstrap over both sets": both show the same row."""
    result = ticft_result()
    result["systems"]["t2v"]["fvd_i3d_detail"] = {"value": 412.5, "low": 380.25, "high": 455.0, "n_a": 8, "n_b": 4}
    paths = write_reports(result, tmp_path)
    assert "| t2v | 412.5 | [380.25, 455] | 8 | 4 |" in paths["md"].read_text().splitlines()
    assert ("<table id='fvd'><tr><th>system</th><th>fvd_i3d</th><th>95% interval</th><th>generated</th><th>real</th>"
            "</tr><tr><td>t2v</td><td>412.5</td><td>[380.25, 455]</td><td>8</td><td>4</td></tr></table>"
            in paths["html"].read_text().replace("\n", ""))

"""`data.trigger_word`: every training caption, validation prompt and held-out caption carries the word."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import CogVideoXPipeline
from safetensors import safe_open

from slapgen.engine.adapters import adapter_info
from slapgen.models.loading import resolve_model
from tests.conftest import cli_stderr, tiny_train_overrides
from trainer.cli import main as cli_main
from trainer.config import load_config
from trainer.datasets import read_dataset, read_training_clips
from trainer.errors import DatasetError, TrainConfigError
from trainer.lora import LORA_FILENAME
from trainer.train import train
from trainer.trigger_word import with_trigger_word

WORD = "pwrslap"


@pytest.mark.parametrize("caption, expected", [
    ("a referee steps in", f"{WORD}, a referee steps in"),                       # prepended
    ("a [trigger] strike, then a stagger", f"a {WORD} strike, then a stagger"),  # the placeholder replaced
    ("[trigger] and [trigger]", f"{WORD} and {WORD}"),
    (f"a {WORD} strike", f"a {WORD} strike"),                                    # already named: unchanged
    (f"a {WORD}s strike", f"{WORD}, a {WORD}s strike"),                          # part of a word is not the word
    ("", WORD),
])
def test_the_rule_is_ai_toolkits(caption, expected):
    """Guards the caption rule users of other trainers wrote their captions for: `[trigger]` becomes the word;
    a caption not naming the word (as a whole word) gets `WORD, ` in front; none leaves it alone."""
    assert with_trigger_word(caption, WORD) == expected
    assert with_trigger_word(caption, None) == caption


@pytest.mark.parametrize("value, message", [('"two\\nlines"', "one line"), ("'[trigger]'", "placeholder")])
def test_a_bad_trigger_word_is_one_sentence(tiny_cache_dir, value, message):
    """Guards a trigger word that cannot be written into a caption reaching the cache: a line break or the
    placeholder itself is refused when the config is read; spaces around it are dropped and an empty one is none.
    A validation prompt holding the placeholder in a run without a word is refused too (it would be generated
    from the literal text)."""
    with pytest.raises(TrainConfigError, match=message):
        load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir, f"data.trigger_word={value}"))
    assert load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir, "data.trigger_word=' x '")).data.trigger_word == "x"
    assert load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir, "data.trigger_word=''")).data.trigger_word is None
    with pytest.raises(TrainConfigError, match=r"validation.prompts hold \[trigger\] but data.trigger_word is not set"):
        load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir, "validation.prompts=['a [trigger] strike']"))


def _dataset_with_a_placeholder(demo_dataset, tmp_path):
    folder = tmp_path / "clips"
    shutil.copytree(demo_dataset, folder)
    first = sorted(folder.glob("*.txt"))[0]
    first.write_text("a [trigger] lands on the jaw")
    return folder, first.stem


def test_a_placeholder_without_a_trigger_word_is_refused(demo_dataset, tmp_path):
    """Guards training on the literal text `[trigger]` when the run has no word to put there."""
    folder, name = _dataset_with_a_placeholder(demo_dataset, tmp_path)
    with pytest.raises(DatasetError, match=rf"caption of {name}.*\[trigger\].*data.trigger_word"):
        read_training_clips(folder)
    assert [clip.caption for clip in read_training_clips(folder, trigger_word=WORD)][0] == f"a {WORD} lands on the jaw"


def test_a_run_trains_on_its_captions_with_the_word(tiny_cache_dir, demo_dataset, tmp_path, monkeypatch):
    """Guards the word never reaching training (only the config recording it): every sample's text embedding is
    diffusers' own `CogVideoXPipeline.encode_prompt` of the caption with the word (`[trigger]` replaced in one,
    `WORD, ` in front of the others), not of the caption as written; the validation prompts get it too; the LoRA
    file records it and `GET /adapters`' entry shows it."""
    import trainer.train as train_module

    folder, _ = _dataset_with_a_placeholder(demo_dataset, tmp_path)
    seen = []
    real_step = train_module.training_step

    def spying_step(transformer, scheduler, batch, draws, transformer_inputs, dtype, frame_plan=None):
        seen.append(batch.prompt_embeds.clone())
        return real_step(transformer, scheduler, batch, draws, transformer_inputs, dtype, frame_plan=frame_plan)

    monkeypatch.setattr(train_module, "training_step", spying_step)
    config = load_config("tiny-smoke", tiny_train_overrides(
        tiny_cache_dir, "train.max_train_steps=4", "train.batch_size=2", "checkpoint.every_steps=100",
        f"data.trigger_word={WORD}"))
    lora = train(config, folder, tmp_path / "run", progress=False)

    resolved = resolve_model("tiny", tiny_cache_dir)
    pipeline = CogVideoXPipeline.from_pretrained(resolved.folder)

    def embedding(text: str) -> torch.Tensor:
        return pipeline.encode_prompt(text, do_classifier_free_guidance=False, device="cpu",
                                      max_sequence_length=resolved.spec.max_sequence_length)[0][0]

    written = [clip.caption for clip in read_dataset(folder)]
    trained = [caption.replace("[trigger]", WORD) if "[trigger]" in caption else f"{WORD}, {caption}"
               for caption in written]
    with_word, as_written = [embedding(text) for text in trained], [embedding(text) for text in written]
    samples = [sample for embeds in seen for sample in embeds]
    assert len(samples) == 8
    for sample in samples:
        assert any(torch.allclose(sample, expected, atol=1e-5) for expected in with_word)
        assert not any(torch.allclose(sample, plain, atol=1e-5) for plain in as_written)

    prompts = load_config("tiny-smoke", tiny_train_overrides(
        tiny_cache_dir, f"data.trigger_word={WORD}", "validation.prompts=['a [trigger] strike','a stagger']"))
    assert prompts.validation_prompts == [f"a {WORD} strike", f"{WORD}, a stagger"]

    with safe_open(str(tmp_path / "run" / LORA_FILENAME), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["slapgen.trigger_word"] == WORD and lora == tmp_path / "run" / LORA_FILENAME
    from peft import LoraConfig

    listed = adapter_info("run", metadata, config.lora.rank, LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha))
    assert listed["trigger_word"] == WORD


def test_eval_puts_the_word_into_the_heldout_captions(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards `slapgen eval` of a trigger-word LoRA measuring held-out loss (and generating) on captions without
    the word it was trained to see: with `--trigger-word` every prompt is the caption with the word, eval.json
    records it, and a bad word is one sentence."""
    out = tmp_path / "eval"
    assert cli_main(["eval", "--model", "tiny", "--heldout", str(demo_dataset), "--out", str(out), "--metrics", "loss",
                     "--max-clips", "2", "--trigger-word", WORD]) == 0
    result = json.loads((out / "eval.json").read_text())
    written = [clip.caption for clip in read_dataset(demo_dataset)][:2]
    assert [prompt["caption"] for prompt in result["prompts"]] == [f"{WORD}, {caption}" for caption in written]
    assert result["trigger_word"] == WORD
    capsys.readouterr()
    assert cli_main(["eval", "--model", "tiny", "--heldout", str(demo_dataset), "--out", str(tmp_path / "bad"),
                     "--metrics", "loss", "--trigger-word", "[trigger]"]) == 2
    assert "--trigger-word: a trigger word cannot hold [trigger]" in cli_stderr(capsys.readouterr().err)


def test_a_sweep_over_trigger_words_is_refused_before_any_run(tiny_cache_dir, tmp_path):
    """Guards a sweep whose runs train with different trigger words: its held-out captions and prompts are one
    set for every run and the base model, so the combined report would refuse the parts after hours of training;
    one trigger word for the whole sweep plans as usual and every run carries it."""
    from trainer.errors import SweepError
    from trainer.sweep.grid import parse_axis, plan_runs

    sets = tiny_train_overrides(tiny_cache_dir)
    with pytest.raises(SweepError, match="sweep each trigger word separately"):
        plan_runs("tiny-smoke", sets, [parse_axis(f"data.trigger_word={WORD},other")], tmp_path / "cache")
    runs = plan_runs("tiny-smoke", [*sets, f"data.trigger_word={WORD}"], [parse_axis("lora.rank=4,8")], tmp_path / "cache")
    assert [run.config.data.trigger_word for run in runs] == [WORD, WORD]


def test_a_run_or_sweep_from_before_the_setting_continues(tiny_cache_dir, tmp_path):
    """Guards every run and sweep started before `data.trigger_word` (and `train.caption_dropout`) existed being
    refused on `--resume` or a rerun ("data.trigger_word: unset in the run, null now"): a setting the saved
    config lacks counts as unchanged when it is at its default now, and as a difference at any other value."""
    from trainer.run_folder import CONFIG_FILE, check_resume_config, config_differences
    from trainer.sweep.folder import difference

    config = load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir))
    now = config.model_dump(mode="json")
    older = json.loads(json.dumps(now))
    del older["data"]["trigger_word"], older["train"]["caption_dropout"]
    import yaml

    assert config_differences(yaml.safe_dump(older), config.to_yaml()) == []
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(older))
    check_resume_config(tmp_path, config.to_yaml())  # no TrainError
    worded = config.model_copy(update={"data": config.data.model_copy(update={"trigger_word": WORD})})
    assert config_differences(yaml.safe_dump(older), worded.to_yaml()) == [
        f'data.trigger_word: unset in the run, "{WORD}" now']

    sweep = {"format": 1, "grid": [], "config": "tiny-smoke", "set": [], "data": "d", "heldout": "h", "metrics": ["loss"],
             "alpha_follows_rank": True, "runs": [{"name": "00", "values": {}, "overrides": [], "config": now}]}
    sweep_before = {**sweep, "runs": [{**sweep["runs"][0], "config": older}]}
    assert difference(sweep_before, sweep) is None
    sweep_worded = {**sweep, "runs": [{**sweep["runs"][0], "config": worded.model_dump(mode="json")}]}
    assert difference(sweep_before, sweep_worded) is not None


def test_eval_takes_the_word_the_adapters_were_trained_with(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards `slapgen eval` of a trigger-word LoRA without `--trigger-word` measuring it on captions without the
    word it learnt: the word comes from the adapter's `slapgen.trigger_word` (said in one line); adapters trained
    with different words are one sentence."""
    from safetensors.torch import load_file, save_file

    from tests.conftest import write_test_adapter

    def worded(name: str, word: str):
        folder = write_test_adapter(tmp_path / name, tiny_cache_dir, rank=4, seed=len(name))
        path = folder / LORA_FILENAME if folder.is_dir() else folder
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        save_file(load_file(str(path)), str(path), metadata={**metadata, "slapgen.trigger_word": word})
        return path

    first, second = worded("first", WORD), worded("second", "other")
    out = tmp_path / "eval"
    assert cli_main(["eval", "--model", "tiny", "--heldout", str(demo_dataset), "--out", str(out), "--metrics", "loss",
                     "--max-clips", "1", "--adapter", f"first={first}"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["trigger_word"] == WORD and result["prompts"][0]["caption"].startswith(f"{WORD}, ")
    assert f"eval: first trained with trigger word {WORD!r}" in capsys.readouterr().out
    assert cli_main(["eval", "--model", "tiny", "--heldout", str(demo_dataset), "--out", str(tmp_path / "two"),
                     "--metrics", "loss", "--adapter", f"first={first}", "--adapter", f"second={second}"]) == 2
    assert "trained with different trigger words (first: 'pwrslap', second: 'other')" in capsys.readouterr().err

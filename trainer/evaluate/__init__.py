"""`slapgen eval`: the base model and each adapter, on a held-out dataset's prompts and seeds.

The only part of `trainer/` that loads the generation engine (`slapgen.engine`): one pipeline serves
every system through its hot-swap LoRA slot. It is imported by `trainer.cli` only when `slapgen eval`
runs, so training never loads the engine.

- `options`: the command's inputs, validated once (`EvalOptions`);
- `systems`: adapters given as files or run folders, staged for the engine's adapter store;
- `run`: held-out loss, generation, metrics, A/B statistics -> the result dict;
- `report`: eval.json, eval.md, report.html;
- `combine`: results computed apart (a sweep's runs and its base model) as one, for `report`;
- `names`: the metric names, importable without the engine.

`slapgen sweep` calls `run.run_eval` on each run's LoRA when asked for generation metrics
(`trainer.sweep.evaluate`), importing `options` and `run` (the engine) only then.
"""

"""Adapter folder validation, the in-memory LRU, and hot-swapping on the compiled tiny model."""

from __future__ import annotations

import json
import re
import shlex
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import slapgen.engine.adapters as adapters_module
from slapgen.engine.adapters import AdapterError, AdapterStore, AdapterTarget
from slapgen.engine.generator import VideoGenerator
from slapgen.models.loading import resolve_model
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.errors import GenerationCancelledError

MAX_RANK = 8
# The engine's tests that take a model run on each family's tiny model: tiny (CogVideoX) and tiny-wan.
MODELS = ["tiny", "tiny-wan"]


def model_fixtures(request, model: str):
    """The session's cache folder holding `model` and its adapters (conftest's `adapter_files` /
    `wan_adapter_files`: a, b and d are in both)."""
    if model == "tiny":
        return request.getfixturevalue("tiny_cache_dir"), request.getfixturevalue("adapter_files")
    return request.getfixturevalue("tiny_wan_cache_dir"), request.getfixturevalue("wan_adapter_files")


@pytest.fixture
def target(tiny_cache_dir):
    from slapgen.models.loading import load_pipeline
    from slapgen.engine.lora_slot import LoraSlot

    pipeline = load_pipeline(resolve_model("tiny", tiny_cache_dir))
    slot = LoraSlot(pipeline.transformer, MAX_RANK, ["to_q", "to_k", "to_v", "to_out.0"])
    return AdapterTarget("tiny", slot.modules, MAX_RANK)


def test_trainer_adapters_validate_and_describe(adapter_files, target, tmp_path):
    store = AdapterStore(tmp_path, target, cache_size=4)
    info = store.add("a", adapter_files["a"].read_bytes()).info()
    assert (info["rank"], info["alpha"], info["base_model"], info["steps"]) == (4, 4.0, "tiny", 1)
    assert info["target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    folder = tmp_path / "b"  # a diffusers LoRA folder works as well as a single file
    folder.mkdir()
    shutil.copy(adapter_files["b"], folder / "pytorch_lora_weights.safetensors")
    assert store.names() == ["a", "b"]
    assert [d["rank"] for d in store.describe()] == [4, 8]


def test_a_delete_removes_adapter_files_and_never_a_folders_lora(adapter_files, target, tmp_path):
    """Guards DELETE /adapters/NAME taking a training run's LoRA: README serves runs straight from their folder
    (SLAP_ADAPTERS_DIR=runs), and deleting adapter `smoke` unlinked runs/smoke/pytorch_lora_weights.safetensors,
    the run's only final LoRA (a walk-through's eval and campaign then named a missing file). A folder's LoRA is
    refused with the sentence saying why, every file of the folder kept; an uploaded file, and a link to a run's
    file, are removed (the link only). An upload under a folder LoRA's name is refused, saying what to do."""
    from slapgen.errors import AdapterExistsError, AdapterNotRemovableError

    store = AdapterStore(tmp_path / "runs", target, cache_size=4)
    run = tmp_path / "runs" / "smoke"  # a training run: its LoRA beside its checkpoints
    (run / "checkpoint-000005").mkdir(parents=True)
    shutil.copy(adapter_files["b"], run / "pytorch_lora_weights.safetensors")
    (run / "checkpoint-000005" / "pytorch_lora_weights.safetensors").write_bytes(adapter_files["a"].read_bytes())
    before = sorted((path.relative_to(run), path.read_bytes()) for path in run.rglob("*") if path.is_file())
    store.add("uploaded", adapter_files["a"].read_bytes())
    (tmp_path / "runs" / "linked.safetensors").symlink_to(run / "pytorch_lora_weights.safetensors")
    assert store.names() == ["linked", "smoke", "uploaded"]

    with pytest.raises(AdapterNotRemovableError) as refused:
        store.remove("smoke")
    assert str(refused.value) == (
        "adapter smoke is the folder smoke/ of the adapters folder (a training run, or a LoRA folder put there by "
        "hand): the service deletes only adapter files it could have been uploaded as (smoke.safetensors); move or "
        "remove the folder yourself")
    assert refused.value.field == "name"
    # An upload under the folder's name is refused with what to do instead: not "delete it first", which the
    # delete above refuses (a walk-through's find).
    with pytest.raises(AdapterExistsError) as taken:
        store.add("smoke", adapter_files["a"].read_bytes())
    assert str(taken.value) == ("adapter smoke already exists; it is the folder smoke/ of the adapters folder, which "
                                "the service never deletes: upload under another name")
    with pytest.raises(AdapterExistsError, match="^adapter uploaded already exists; delete it first$"):
        store.add("uploaded", adapter_files["b"].read_bytes())
    assert sorted((path.relative_to(run), path.read_bytes()) for path in run.rglob("*") if path.is_file()) == before
    store.remove("uploaded")
    store.remove("linked")
    assert store.names() == ["smoke"] and not (tmp_path / "runs" / "uploaded.safetensors").exists()
    assert (run / "pytorch_lora_weights.safetensors").read_bytes() == adapter_files["b"].read_bytes()


READ_AN_UNREADABLE_FOLDER = r"""
import json, os, pickle, sys
from pathlib import Path
from slapgen.engine.adapters import AdapterError, AdapterStore

folder, target = Path(sys.argv[1]), pickle.loads(Path(sys.argv[2]).read_bytes())
store = AdapterStore(folder, target, cache_size=4)
seen = {"names": store.names(), "described": store.describe(), "a": store.get("a").rank}
try:
    store.get("locked")
except AdapterError as error:
    seen["locked"] = str(error)
os.chmod(folder, 0)  # the whole folder unreadable: a stale NFS handle reads the same way
try:
    store.names()
except AdapterError as error:
    seen["folder"] = str(error)
finally:
    os.chmod(folder, 0o755)
print(json.dumps(seen))
"""


@pytest.mark.slow  # a Python process without root's permission override
def test_an_unreadable_entry_of_the_adapters_folder_is_that_entrys_problem(adapter_files, target, tmp_path):
    """Guards one unreadable entry of SLAP_ADAPTERS_DIR breaking the service: a folder without permission (a
    user's, or `lost+found` on a volume for a service that is not root) made `Path.is_file` raise, so every request
    (the base model's too), `GET /adapters` and start-up ended in a PermissionError traceback (a review's find). In a
    process without root's permission override, the other adapters are listed and served, the locked one is not
    listed and naming it is one sentence; an unreadable folder itself is one sentence (start-up says it)."""
    import os
    import pickle
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, offline_env

    folder = tmp_path / "adapters"
    folder.mkdir()
    shutil.copy(adapter_files["a"], folder / "a.safetensors")
    for locked in ("locked", "lost+found"):
        (folder / locked).mkdir()
        shutil.copy(adapter_files["b"], folder / locked / "pytorch_lora_weights.safetensors")
        (folder / locked).chmod(0)
    (tmp_path / "target.pickle").write_bytes(pickle.dumps(target))
    # As root, drop the capabilities that let root read anything (what a service that is not root lacks).
    unprivileged = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    try:
        done = subprocess.run([*unprivileged, sys.executable, "-c", READ_AN_UNREADABLE_FOLDER, str(folder),
                               str(tmp_path / "target.pickle")], cwd=REPO_ROOT, env=offline_env(tmp_path),
                              capture_output=True, text=True, timeout=300)
    finally:
        for locked in ("locked", "lost+found"):
            (folder / locked).chmod(0o755)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["names"] == ["a"] and [entry["name"] for entry in seen["described"]] == ["a"] and seen["a"] == 4
    assert seen["locked"] == "adapter locked cannot be read (Permission denied)"  # no server path to a client
    assert seen["folder"] == f"the adapters folder {folder} cannot be read (Permission denied)"


def test_a_file_larger_than_an_upload_may_be_is_refused_before_it_is_read(adapter_files, target, tmp_path):
    """Guards a file put in the adapters folder by hand being read whole at every request that names it: a 6 GB
    file took 35 s and 6.6 GiB of the worker each time, only to be refused for its header (a review's find). A
    file above the upload limit is refused from its size (a sparse file here: reading it would take 3 GiB), in
    the listing too, a file with a bad header from its header alone, and one whose header fails the checks
    (another base model) from its header too."""
    import os

    store = AdapterStore(tmp_path, target, cache_size=4)
    shutil.copy(adapter_files["a"], tmp_path / "a.safetensors")
    with open(tmp_path / "huge.safetensors", "wb") as huge:
        huge.write((2**20).to_bytes(8, "little"))  # a header length, then nothing but (sparse) zeros
        os.truncate(huge.fileno(), adapters_module.MAX_ADAPTER_BYTES + 2**30)
    sentence = "adapter huge is 3.0 GiB, larger than the 2 GiB an adapter may be"
    with pytest.raises(AdapterError) as refused:
        store.get("huge")
    assert str(refused.value) == sentence
    assert {entry["name"]: entry.get("error") for entry in store.describe()} == {"a": None, "huge": sentence}
    reads = []
    parse = adapters_module.parse_adapter
    with pytest.MonkeyPatch.context() as patch:  # the whole file is parsed right after it is read
        patch.setattr(adapters_module, "parse_adapter", lambda name, data, target: reads.append(name) or parse(name, data, target))
        os.truncate(tmp_path / "huge.safetensors", 2**30)  # under the limit now, its header still garbage
        with pytest.raises(AdapterError, match="adapter huge is not a readable safetensors file"):
            store.get("huge")
        shutil.copy(adapter_files["other-model"], tmp_path / "other.safetensors")
        with pytest.raises(AdapterError, match="CogVideoX-5b"):
            store.get("other")
        assert store.get("a").rank == 4
    assert reads == ["a"]  # neither refused file was read whole


def test_the_listing_shows_the_alpha_and_modules_the_slot_swaps_in(adapter_files, target, tmp_path):
    """Guards GET /adapters showing slapgen's own metadata rather than what is used: an upload whose
    `slapgen.alpha` said 4 while its peft config (diffusers' `lora_adapter_metadata`, which the slot swaps in by)
    said 64 was listed at alpha 4, and a peft `target_modules` given as one string was listed as its sorted
    characters (a review's finds). The listing and a loaded adapter's info show the config's alpha and modules,
    the string as one entry; diffusers' own file without metadata shows the alpha diffusers assumes (its rank)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from slapgen.models import lora_format

    with safe_open(str(adapter_files["b"]), "pt") as opened:
        metadata = dict(opened.metadata())
    peft = json.loads(metadata[lora_format.DIFFUSERS_METADATA_KEY])
    assert float(metadata[lora_format.ALPHA_KEY]) == 4.0
    peft["lora_alpha"], peft["target_modules"] = 64, "to_q|to_k|to_v|to_out.0"
    store = AdapterStore(tmp_path, target, cache_size=4)
    save_file(load_file(adapter_files["b"]), tmp_path / "mixed.safetensors",
              metadata={**metadata, lora_format.DIFFUSERS_METADATA_KEY: json.dumps(peft)})
    shutil.copy(adapter_files["no-alpha"], tmp_path / "plain.safetensors")
    listed = {entry["name"]: entry for entry in store.describe()}
    assert (listed["mixed"]["alpha"], listed["mixed"]["target_modules"]) == (64.0, ["to_q|to_k|to_v|to_out.0"])
    assert store.get("mixed").config.lora_alpha == 64 and store.get("mixed").info() == listed["mixed"]
    # Without diffusers' metadata it targets every module path its keys name: listed once per kind, the block
    # number folded (it was null, as if it targeted nothing).
    modules = {lora_format.KEY_PATTERN.match(key)["module"] for key in load_file(adapter_files["no-alpha"])}
    kinds = sorted({re.sub(r"^transformer_blocks\.\d+\.", "transformer_blocks.N.", module) for module in modules})
    assert "transformer_blocks.N.attn1.to_q" in kinds
    assert (listed["plain"]["rank"], listed["plain"]["alpha"], listed["plain"]["target_modules"]) == (4, 4.0, kinds)


RULE = "(1-64 characters of a-z, 0-9, _ and -)"


def test_a_sweeps_run_folders_are_listed_with_why_they_are_not_served(adapter_files, target, tmp_path):
    """Guards a sweep's runs folder served as SLAP_ADAPTERS_DIR looking empty: its run folders
    (`03-learning_rate=1e-2_rank=8/pytorch_lora_weights.safetensors`) have `=` in their names, which adapter
    names do not allow, and were skipped without a word (`GET /adapters` was `[]`). Every adapter-like entry
    (a folder holding the weights file, a *.safetensors file) whose name is not allowed is listed with the
    sentence saying why and the one-liner that links it under an allowed name; it never sizes the slot and
    is never served. Once linked (the one-liner, as a shell splits it), it is served under the new name and
    no longer listed, and deleting that adapter removes the link only."""
    from slapgen.engine.adapters import largest_rank_in

    runs = tmp_path / "runs"
    for run in ("03-learning_rate=1e-2_rank=8", "04-learning_rate=1e-3_rank=8"):
        (runs / run / "logs").mkdir(parents=True)
        shutil.copy(adapter_files["a"], runs / run / "pytorch_lora_weights.safetensors")
    shutil.copy(adapter_files["b"], runs / "My LoRA.safetensors")
    (runs / "sweep.json").write_text("{}")  # not adapter-like: neither listed nor served
    (runs / "empty-run").mkdir()
    store = AdapterStore(runs, target, cache_size=2)
    expected = {
        "03-learning_rate=1e-2_rank=8": "adapter folder `03-learning_rate=1e-2_rank=8` is not served: its name is not "
        f"an adapter name {RULE}; rename it, or link it under an allowed name from inside the adapters folder, e.g. "
        "`ln -s 03-learning_rate=1e-2_rank=8/pytorch_lora_weights.safetensors 03-learning_rate_1e-2_rank_8.safetensors`",
        "04-learning_rate=1e-3_rank=8": "adapter folder `04-learning_rate=1e-3_rank=8` is not served: its name is not "
        f"an adapter name {RULE}; rename it, or link it under an allowed name from inside the adapters folder, e.g. "
        "`ln -s 04-learning_rate=1e-3_rank=8/pytorch_lora_weights.safetensors 04-learning_rate_1e-3_rank_8.safetensors`",
        "My LoRA": "adapter file `My LoRA.safetensors` is not served: `My LoRA` is not an adapter name "
        f"{RULE}; rename it, or link it under an allowed name from inside the adapters folder, e.g. "
        "`ln -s 'My LoRA.safetensors' my_lora.safetensors`",
    }
    assert store.names() == [] and largest_rank_in(runs, target) == 0
    assert store.describe() == [{"name": name, "error": error} for name, error in expected.items()]
    for name in expected:
        with pytest.raises(AdapterError, match="must be 1-64 characters"):
            store.get(name)

    for name in ("03-learning_rate=1e-2_rank=8", "My LoRA"):
        command, option, source, link = shlex.split(expected[name].rsplit("`", 2)[1])
        assert (command, option) == ("ln", "-s")
        (runs / link).symlink_to(source)  # what `ln -s SOURCE LINK` does in the folder
    assert store.names() == ["03-learning_rate_1e-2_rank_8", "my_lora"]
    listed = {entry["name"]: entry for entry in store.describe()}
    assert sorted(listed) == ["03-learning_rate_1e-2_rank_8", "04-learning_rate=1e-3_rank=8", "my_lora"]
    assert (listed["03-learning_rate_1e-2_rank_8"]["rank"], listed["my_lora"]["rank"]) == (4, 8)
    assert listed["04-learning_rate=1e-3_rank=8"]["error"] == expected["04-learning_rate=1e-3_rank=8"]
    assert store.get("my_lora").rank == 8 and largest_rank_in(runs, target) == 8
    store.remove("my_lora")
    assert (runs / "My LoRA.safetensors").read_bytes() == adapter_files["b"].read_bytes()


def _wrong_keys(data: bytes, tmp_path) -> bytes:
    path = tmp_path / "wrong.safetensors"
    path.write_bytes(data)
    tensors = {key.replace("transformer.", "unet."): value for key, value in load_file(path).items()}
    save_file(tensors, path)
    return path.read_bytes()


def _unknown_module(data: bytes, tmp_path) -> bytes:
    path = tmp_path / "unknown.safetensors"
    path.write_bytes(data)
    tensors = load_file(path)
    tensors["transformer.transformer_blocks.0.ff.net.2.lora_A.weight"] = torch.zeros(4, 4)
    save_file(tensors, path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("x", lambda files, tmp: files["a"].read_bytes()[:3000], "not a readable safetensors"),
        ("x", lambda files, tmp: b"not a safetensors file at all", "not a readable safetensors"),
        ("x", lambda files, tmp: _wrong_keys(files["a"].read_bytes(), tmp), "not a diffusers transformer LoRA key"),
        ("x", lambda files, tmp: _unknown_module(files["a"].read_bytes(), tmp), "not a LoRA-able module"),
        ("x", lambda files, tmp: files["big"].read_bytes(), "rank 16, above the LoRA slot's rank 8"),
        ("x", lambda files, tmp: files["other-model"].read_bytes(), "trained on THUDM/CogVideoX-5b"),
        ("../x", lambda files, tmp: files["a"].read_bytes(), "must be 1-64 characters"),
        ("A", lambda files, tmp: files["a"].read_bytes(), "must be 1-64 characters"),
        ("a", lambda files, tmp: files["a"].read_bytes(), "already exists"),
    ],
)
def test_bad_uploads_change_nothing(adapter_files, target, tmp_path, name, make, message):
    folder = tmp_path / "adapters"
    store = AdapterStore(folder, target, cache_size=4)
    store.add("a", adapter_files["a"].read_bytes())
    before = sorted(p.name for p in folder.rglob("*"))
    with pytest.raises(AdapterError) as error:
        store.add(name, make(adapter_files, tmp_path))
    assert message in str(error.value)
    assert sorted(p.name for p in folder.rglob("*")) == before
    assert not (tmp_path / "x.safetensors").exists()


def test_another_familys_adapter_is_refused_naming_its_model(wan_adapter_files, target, tmp_path):
    """Guards a tiny-wan LoRA uploaded to (or `slapgen generate --adapter`ed on) the CogVideoX tiny model
    answered with "blocks.N.attn1.to_k, ... (16 modules) are not LoRA-able modules of tiny ... the modules
    SLAP_LORA_TARGET_MODULES names", which sends the user to a setting that cannot help: the model its
    metadata names is checked before its keys, and the sentence says which model to use it with."""
    folder = tmp_path / "adapters"
    store = AdapterStore(folder, target, cache_size=4)
    with pytest.raises(AdapterError) as error:
        store.add("wan", wan_adapter_files["a"].read_bytes())
    assert str(error.value) == ("adapter wan was trained on tiny-wan, but the model here is tiny; use it with that "
                                "model (SLAP_MODEL=tiny-wan, or --model tiny-wan on the command line)")
    assert list(folder.rglob("*")) == []


@pytest.mark.parametrize("layout, key", [("musubi-tuner", "lora_unet_blocks_0_self_attn_q"),
                                         ("wan-original", "diffusion_model.blocks.0.self_attn.q")])
def test_a_community_wan_lora_on_cogvideox_says_it_is_for_wan(target, tmp_path, layout, key):
    """Guards a musubi-tuner (or diffusion-pipe) Wan LoRA uploaded to a CogVideoX service answered with its
    first key, "lora_unet_blocks_0_self_attn_q.alpha is not a diffusers transformer LoRA key": the sentence
    says the file is in a layout slapgen converts for Wan models only, and nothing is stored. On a Wan model,
    such a file copied into the folder (not uploaded) says to upload it, and the command line's `--adapter` says
    what the file is and how to get diffusers' layout."""
    from dataclasses import replace

    path = tmp_path / "community.safetensors"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 32), f"{key}.lora_up.weight": torch.zeros(32, 4),
               f"{key}.alpha": torch.tensor(4.0)}, path)
    folder = tmp_path / "adapters"
    store = AdapterStore(folder, replace(target, family="cogvideox"), cache_size=4)
    with pytest.raises(AdapterError) as error:
        store.add("community", path.read_bytes())
    assert str(error.value) == (f"adapter community is in the {layout} layout, which slapgen converts for wan models "
                                "only; the model here is tiny, a cogvideox model, whose adapters must be in diffusers' "
                                "layout (transformer.<module>.lora_A/B.weight)")
    assert list(folder.rglob("*")) == []

    # A Wan model's own community layout copied into the folder (only an upload converts it): it said its first key
    # was not a diffusers key. The listing and a request say to upload it.
    wan_folder = tmp_path / "wan-adapters"
    wan_folder.mkdir()
    shutil.copy(path, wan_folder / "copied.safetensors")
    wan_store = AdapterStore(wan_folder, replace(target, family="wan"), cache_size=4)
    said = (f"adapter copied is in the {layout} layout, which slapgen converts to diffusers' layout when it is uploaded "
            "(POST /adapters/upload, or the web studio): upload it rather than copying the file into the adapters folder")
    assert wan_store.describe() == [{"name": "copied", "error": said}]
    with pytest.raises(AdapterError, match=re.escape(said)):
        wan_store.get("copied")

    # `slapgen generate` / `eval --adapter FILE`: "holds no transformer LoRA weights", of a file full of them.
    from trainer.errors import EvalError
    from trainer.evaluate.options import AdapterArg
    from trainer.evaluate.systems import resolve_systems

    with pytest.raises(EvalError) as refused:
        resolve_systems((AdapterArg("community", path, typed=str(path)),), include_base=False)
    assert str(refused.value) == (
        f"--adapter {path}: {path} holds no transformer LoRA weights in diffusers' layout: it is a wan LoRA in the "
        f"{layout} layout, which slapgen converts on upload; upload it once to a service of the model (POST "
        "/adapters/upload) and pass the file it stores, SLAP_ADAPTERS_DIR/NAME.safetensors")


def test_recent_adapters_come_from_memory(adapter_files, target, tmp_path, monkeypatch):
    store = AdapterStore(tmp_path, target, cache_size=2)
    for name in ("a", "b"):
        store.add(name, adapter_files[name].read_bytes())
    reads = []
    original = adapters_module.parse_adapter
    monkeypatch.setattr(adapters_module, "parse_adapter", lambda *a: reads.append(a[0]) or original(*a))
    store.get("a"), store.get("b"), store.get("a"), store.get("b")
    assert reads == ["a", "b"]  # switching back hits the LRU
    assert [d["rank"] for d in store.describe()] == [4, 8]
    assert reads == ["a", "b"] and store.cached_names() == ["a", "b"]  # listing reads headers only
    small = AdapterStore(tmp_path, target, cache_size=1)
    small.get("a"), small.get("b"), small.get("a")
    assert reads == ["a", "b", "a", "b", "a"]  # evicted: read again
    shutil.copy(adapter_files["b"], tmp_path / "a.safetensors")  # changed on disk: read again
    assert store.get("a").rank == 8


@pytest.mark.slow
@pytest.mark.parametrize("model, scope", [("tiny", "blocks"), ("tiny-wan", "blocks"), ("tiny", "transformer"),
                                          ("tiny-wan", "transformer")])
def test_hot_swap_on_the_compiled_model_never_recompiles(model, scope, tmp_path, request):
    """base -> A -> B -> A -> base on the torch.compile'd tiny transformer of each family (its blocks compiled, the
    default, and on CogVideoX the whole transformer too: SLAP_COMPILE_SCOPE), with dynamo told
    to fail on any recompilation; outputs prove each swap took effect and swapping back restores exactly, also
    after a cancelled generation and between a TIC-FT adapter (image-to-video: its own first latents and step
    callback) and a plain one. On tiny-wan it guards the slot and TIC-FT on Wan's transformer and its UniPC
    scheduler (a hook or re-injection that made dynamo guard on a Python value would recompile)."""
    from tests.conftest import write_test_adapter

    tiny_cache_dir, adapter_files = model_fixtures(request, model)
    adapters_dir = tmp_path / "adapters"
    adapters_dir.mkdir()
    for name in ("a", "b"):
        shutil.copy(adapter_files[name], adapters_dir / f"{name}.safetensors")
    write_test_adapter(tmp_path / "ticft", tiny_cache_dir, rank=4, seed=12, ticft_layout="c1b1t1", model=model)
    shutil.copy(tmp_path / "ticft" / "pytorch_lora_weights.safetensors", adapters_dir / "ticft.safetensors")
    options = EngineOptions(compile=True, compile_scope=scope, adapters_dir=adapters_dir, max_lora_rank=MAX_RANK)
    generator = VideoGenerator.load(resolve_model(model, tiny_cache_dir), options)
    assert generator.info()["compiled"] is True and generator.compiled.graphs >= 1
    assert generator.info()["compile_scope"] == scope
    # dynamo's wrapper around the whole transformer only when that is what was asked (blocks: compiled in place)
    assert hasattr(generator.pipeline.transformer, "_orig_mod") == (scope == "transformer")
    # torch's own patch (pytest's monkeypatch undo leaves dynamo's config entry hidden for later tests).
    recompiles_fail = torch._dynamo.config.patch(error_on_recompile=True)
    recompiles_fail.__enter__()
    request.addfinalizer(lambda: recompiles_fail.__exit__(None, None, None))
    base = GenerationParams.defaults_for(generator.spec, seed=3)
    frames = {}
    for label, adapter in [("base", None), ("a", "a"), ("b", "b"), ("a again", "a"), ("base again", None)]:
        frames[label] = generator.generate_frames(base.replace(adapter=adapter))
        assert generator.info()["adapter"] == adapter
    half = generator.generate_frames(base.replace(adapter="a", adapter_scale=0.5))
    # A cancelled generation (web studio's Cancel) leaves the compiled graph and the slot as they were.
    with pytest.raises(GenerationCancelledError):
        generator.generate_frames(base.replace(adapter="b"), cancelled=lambda: generator.slot.swaps == 4)
    assert np.array_equal(generator.generate_frames(base.replace(adapter="a")), frames["a"])
    assert generator.info()["recompilations"] == 0
    assert generator.slot.swaps == 5  # a, b, a, then b (cancelled) and a: scale changes and the base model are not swaps
    assert np.array_equal(frames["base"], frames["base again"])
    assert np.array_equal(frames["a"], frames["a again"])
    assert not np.array_equal(frames["a"], frames["b"])
    assert not np.array_equal(frames["base"], frames["a"])
    assert not np.array_equal(half, frames["a"]) and not np.array_equal(half, frames["base"])
    image = (np.random.default_rng(3).random((64, 96, 3)) * 255).astype(np.uint8)
    animated = generator.generate_frames(base.replace(adapter="ticft", condition_image=image))
    assert np.array_equal(generator.generate_frames(base.replace(adapter="a")), frames["a"])
    assert np.array_equal(generator.generate_frames(base.replace(adapter="ticft", condition_image=image)), animated)
    assert animated.shape == (4, 64, 96, 3) and generator.info()["recompilations"] == 0
    assert json.dumps(generator.info())  # /info is plain JSON
    assert generator.info()["family"] == {"tiny": "cogvideox", "tiny-wan": "wan"}[model]


@pytest.mark.parametrize("model, name, scale", [("tiny", "b", 0.7), ("tiny", "d", 1.3), ("tiny", "no-alpha", 0.6),
                                                  ("tiny", "b", 0.0), ("tiny-wan", "b", 0.7), ("tiny-wan", "d", 1.3)])
def test_serving_an_adapter_matches_plain_diffusers(model, tmp_path, name, scale, request):
    """Guards a hot-swap slot whose scale ignores alpha / rank (or applies it twice), a padded slot
    that changes the maths, and an adapter_scale that is not diffusers' `set_adapters` weight: the
    engine's frames at `adapter_scale` s must equal plain diffusers' `load_lora_weights` +
    `set_adapters(name, s)` on the same fp32 tiny model (the family's pipeline: CogVideoXPipeline,
    WanPipeline), seed and settings. b has alpha/rank 1/2, d 3, no-alpha carries no alpha (diffusers then
    takes alpha = rank); all sit in a rank-8 slot."""
    from slapgen.models.family import family_of

    tiny_cache_dir, adapter_files = model_fixtures(request, model)
    adapters_dir = tmp_path / "adapters"
    adapters_dir.mkdir()
    shutil.copy(adapter_files[name], adapters_dir / f"{name}.safetensors")
    resolved = resolve_model(model, tiny_cache_dir)
    generator = VideoGenerator.load(resolved, EngineOptions(adapters_dir=adapters_dir, max_lora_rank=MAX_RANK))
    # 5 frames of 32x48, not the spec's 9 of 64x96: the maths compared is per token, and the VAE decode of the
    # larger clip was most of each of the case's three generations.
    params = GenerationParams.defaults_for(generator.spec, seed=3, num_inference_steps=3, adapter=name,
                                           adapter_scale=scale, num_frames=5, height=32, width=48)
    served = generator.generate_frames(params)

    family = family_of(resolved.spec)
    reference = family.pipeline_class().from_pretrained(resolved.folder, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(adapter_files[name].parent), weight_name=adapter_files[name].name, adapter_name=name)
    reference.set_adapters(name, scale)
    expected = reference(**family.pipeline_arguments(params.pipeline_arguments()),
                         generator=torch.Generator("cpu").manual_seed(params.seed), output_type="np").frames[0]
    assert served.shape == expected.shape
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-3)
    if scale > 0:  # the tolerance is far below what the adapter changes, so a wrong scale cannot pass
        base = generator.generate_frames(params.replace(adapter=None))
        assert np.abs(expected - base).max() > 0.05


def test_slot_is_sized_from_the_adapters_present_at_start_up(adapter_files, tiny_cache_dir, tmp_path):
    """Guards the default slot refusing a preset's own LoRA (aggressive trains rank 256 > 128) and a
    slot sized for the biggest possible adapter making every smaller one pay: with no SLAP_MAX_LORA_RANK
    the slot is the largest rank present at start-up, at least 128."""
    from slapgen.engine.generator import DEFAULT_SLOT_RANK
    from tests.conftest import write_test_adapter

    resolved = resolve_model("tiny", tiny_cache_dir)
    small = tmp_path / "small"
    small.mkdir()
    shutil.copy(adapter_files["a"], small / "a.safetensors")
    assert VideoGenerator.load(resolved, EngineOptions(adapters_dir=small)).slot.max_rank == DEFAULT_SLOT_RANK == 128

    large = tmp_path / "large"
    large.mkdir()
    shutil.copy(adapter_files["a"], large / "a.safetensors")
    write_test_adapter(large / "wide", tiny_cache_dir, rank=256, seed=9, alpha=128)
    (large / "junk.safetensors").write_bytes(b"not an adapter")  # ignored when sizing, listed with its error
    generator = VideoGenerator.load(resolved, EngineOptions(adapters_dir=large))
    assert generator.slot.max_rank == 256 and generator.info()["max_lora_rank"] == 256
    frames = generator.generate_frames(GenerationParams.defaults_for(generator.spec, num_inference_steps=2, adapter="wide"))
    assert np.isfinite(frames).all()
    assert {d["name"]: "error" in d for d in generator.adapters.describe()} == {"a": False, "junk": True, "wide": False}


def test_lora_a_and_b_ranks_must_agree(adapter_files, target, tmp_path):
    """Guards validation that reads the rank from lora_A alone: a module whose lora_B has another rank
    (or no lora_B) passes the header check and fails inside the hot-swap, breaking the slot."""
    tensors = load_file(adapter_files["a"])
    key = next(k for k in tensors if k.endswith("to_q.lora_B.weight"))
    mismatched = dict(tensors, **{key: torch.zeros(tensors[key].shape[0], 3)})
    save_file(mismatched, tmp_path / "mismatched.safetensors")
    store = AdapterStore(tmp_path / "adapters", target, cache_size=2)
    with pytest.raises(AdapterError, match="lora_A of rank 4 but lora_B of rank 3"):
        store.add("x", (tmp_path / "mismatched.safetensors").read_bytes())
    missing = {k: v for k, v in tensors.items() if k != key}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(AdapterError, match="has no lora_B weight"):
        store.add("x", (tmp_path / "missing.safetensors").read_bytes())
    assert store.names() == []

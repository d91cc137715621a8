"""Recipes: validation with one-line errors naming file and key, overrides, the shipped recipes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fatscale  # noqa: F401
from fatscale.config import RecipeError, dump, flatten, load_recipe, resolve, to_dict
from fatscale.data.config import ResolutionConfig

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def minimal(tmp_path: Path) -> dict:
    return {"model": {"name": "fat_b0"}, "data": {"shards": str(tmp_path)}, "train": {"epochs": 3}}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(recipe):
    loaded = load_recipe(recipe, check_shards=False)
    assert loaded.tracking.run_name == recipe.stem


@pytest.mark.parametrize("variant,drop_path", [("b0", 0.05), ("b1", 0.1), ("b2", 0.1), ("b3", 0.15)])
def test_official_setup_in_300ep_recipes(variant, drop_path):
    r = load_recipe(REPO / "recipes" / f"fat_{variant}_300ep.yaml", check_shards=False)
    assert (r.model.name, r.model.drop_path) == (f"fat_{variant}", drop_path)
    assert (r.train.epochs, r.train.batch_per_device, r.train.grad_clip, r.train.precision) == (300, 128, 5.0, "bf16")
    o = r.optim
    assert (o.lr, o.lr_base_batch, o.weight_decay, o.betas, o.eps) == (5e-4, 512, 0.05, (0.9, 0.999), 1e-8)
    assert (o.warmup_epochs, o.warmup_lr, o.min_lr) == (20, 5e-7, 5e-6)
    a = r.aug
    assert (a.rand_augment, a.color_jitter, a.reprob, a.mixup, a.cutmix, a.label_smoothing) == (
        "rand-m9-mstd0.5-inc1", 0.4, 0.25, 0.8, 1.0, 0.1)
    assert (r.data.crop_pct, r.data.img_size) == (0.875, 224) and r.ema.enabled
    # the fast path, on by default: compiled (inductor), channels_last, bf16, fused AdamW
    assert (r.model.compile, r.model.compile_backend, r.data.channels_last, r.optim.fused) == (True, "inductor", True, True)
    assert r.data.resolution is None and r.data.eval_sizes == ()


@pytest.mark.parametrize("variant", ["b0", "b3"])
def test_fast_recipes_are_the_official_setup_with_progressive_resolution(variant):
    fast = load_recipe(REPO / "recipes" / f"fat_{variant}_fast.yaml", check_shards=False)
    official = load_recipe(REPO / "recipes" / f"fat_{variant}_300ep.yaml", check_shards=False)
    sizes = [fast.data.train_size(epoch) for epoch in range(fast.train.epochs)]
    assert {size: sizes.count(size) for size in set(sizes)} == {160: 180, 192: 60, 224: 60}
    assert sizes[:150] == [160] * 150 and sizes[270:] == [224] * 30 and sizes == sorted(sizes)
    assert fast.data.eval_sizes == (256,) and fast.data.img_size == 224
    fast_keys, official_keys = flatten(to_dict(fast)), flatten(to_dict(official))
    differ = sorted(key for key in fast_keys.keys() | official_keys.keys() if fast_keys.get(key) != official_keys.get(key))
    assert differ == ["data.eval_sizes", "data.resolution.end", "data.resolution.ramp", "data.resolution.start",
                      "data.resolution.step", "output_dir", "tracking.run_name"]  # nothing else


@pytest.mark.parametrize(
    "change,message",
    [
        ({"train": {"epochs": "ten"}}, "r.yaml: train.epochs: expected an integer, got 'ten'"),
        ({"train": {"epochs": 3, "epoch": 3}}, "r.yaml: train.epoch: unknown key"),
        ({"optimizer": {}}, "r.yaml: optimizer: unknown key"),
        ({"train": {"epochs": 0}}, "r.yaml: train.epochs: must be at least 1, got 0"),
        ({"train": {"epochs": 3, "precision": "fp8"}}, "r.yaml: train.precision: expected one of 'bf16', 'fp16', 'fp32', got 'fp8'"),
        ({"train": {"epochs": 3, "zero_stage": 3}}, "r.yaml: train.zero_stage: expected one of 0, 1, 2, got 3"),
        ({"train": {"epochs": 3, "sync_bn": "yes"}}, "r.yaml: train.sync_bn: expected true or false, got 'yes'"),
        ({"optim": {"betas": [0.9]}}, "r.yaml: optim.betas: expected a list of 2 values, got [0.9]"),
        ({"aug": {"reprob": 1.5}}, "r.yaml: aug.reprob: must be a probability, got 1.5"),
        ({"aug": {"rand_augment": "rand-m9-msdt0.5"}}, "r.yaml: aug.rand_augment: invalid RandAugment string"),
        ({"aug": {"rand_augment_interp": "bicubic"}},
         "r.yaml: aug.rand_augment_interp: must be auto, nearest or linear, got 'bicubic'"),
        ({"model": {"name": "fat_b9"}}, "r.yaml: model.name: must be a timm model"),
        ({"model": {"name": "fat_b0", "drop_path": 1.5}}, "r.yaml: model.drop_path: must be in [0, 1), got 1.5"),
        ({"model": {"name": "fat_b0", "compile_backend": "cudagraphs"}},
         "r.yaml: model.compile_backend: must be inductor, aot_eager or eager, got 'cudagraphs'"),
        ({"train": {"epochs": 3, "batch_per_device": 7}}, "r.yaml: train.batch_per_device: Mixup/CutMix needs an even batch"),
        ({"model": None}, "r.yaml: model: expected a mapping"),
        ({"train": {"epochs": 3, "precision": "fp16", "zero_stage": 1}},
         "r.yaml: train.precision: fp16 with train.zero_stage 1 clips gradients before they are unscaled"),
    ],
)
def test_bad_recipes_fail_with_one_line_naming_file_and_key(tmp_path, change, message):
    recipe = minimal(tmp_path)
    for section, values in change.items():
        recipe[section] = values if values is None else {**recipe.get(section, {}), **values}
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, recipe), check_shards=False)
    assert str(error.value).startswith(f"{tmp_path / 'r.yaml'}: ")
    assert message.split("r.yaml: ", 1)[1] in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("resolution,epochs,sizes", [
    ({"start": 160, "end": 224, "ramp": [2, 6]}, 8, [160, 160, 160, 192, 192, 224, 224, 224]),  # 176, 208: halves up
    ({"start": 128, "end": 256, "ramp": [0, 3]}, 5, [128, 160, 224, 256, 256]),  # 170.7 -> 160, 213.3 -> 224
    ({"start": 128, "end": 224, "ramp": [1, 7], "step": 16}, 9, [128, 128, 144, 160, 176, 192, 208, 224, 224]),
    ({"start": 256, "end": 128, "ramp": [0, 4]}, 6, [256, 224, 192, 160, 128, 128]),  # down
    ({"start": 128, "end": 224, "ramp": [3, 3]}, 5, [128, 128, 128, 224, 224]),  # a switch
    (None, 3, [224, 224, 224]),  # no schedule: data.img_size
])
def test_the_resolution_schedule_gives_each_epoch_s_train_size(tmp_path, resolution, epochs, sizes):
    recipe = minimal(tmp_path)
    recipe["data"]["resolution"], recipe["train"]["epochs"] = resolution, epochs
    data = load_recipe(write(tmp_path, recipe), check_shards=False).data
    assert [data.train_size(epoch) for epoch in range(epochs)] == sizes
    assert data.img_size == 224 and data.val_sizes == (224,)  # the eval size stays data.img_size


RAMP = {"start": 160, "end": 224, "ramp": [2, 6]}


@pytest.mark.parametrize("data,message", [
    ({"resolution": {**RAMP, "start": 16}}, "data.resolution.start: must be at least 32, got 16"),
    ({"resolution": {**RAMP, "start": 0, "end": 0}}, "data.resolution.start: must be at least 32, got 0"),
    ({"resolution": {**RAMP, "end": 24, "step": 8}}, "data.resolution.end: must be at least 32, got 24"),
    ({"resolution": {**RAMP, "start": 160.0}}, "data.resolution.start: expected an integer, got 160.0"),
    ({"resolution": {**RAMP, "end": "224"}}, "data.resolution.end: expected an integer, got '224'"),
    ({"resolution": {**RAMP, "start": 150}}, "data.resolution.start: must be a multiple of data.resolution.step (32), got 150"),
    ({"resolution": {**RAMP, "end": 230}},  # the rounded ramp would never reach it
     "data.resolution.end: must be a multiple of data.resolution.step (32), got 230"),
    ({"resolution": {**RAMP, "ramp": [6, 2]}},
     "data.resolution.ramp: must be [first, last] epochs, 0 <= first <= last, got (6, 2)"),
    ({"resolution": {**RAMP, "ramp": [-1, 2]}},
     "data.resolution.ramp: must be [first, last] epochs, 0 <= first <= last, got (-1, 2)"),
    ({"resolution": {**RAMP, "ramp": [2, 10]}}, "data.resolution.ramp: ends at epoch 10, not before train.epochs 10 "
                                                "(epochs 0..9): data.resolution.end 224 is never reached"),
    ({"resolution": {**RAMP, "ramp": [12, 12]}}, "data.resolution.ramp: ends at epoch 12, not before train.epochs 10 "
                                                 "(epochs 0..9): data.resolution.end 224 is never reached"),
    ({"resolution": {**RAMP, "ramp": [2]}}, "data.resolution.ramp: expected a list of 2 values, got [2]"),
    ({"resolution": {**RAMP, "ramp": [2, 6.5]}}, "data.resolution.ramp[1]: expected an integer, got 6.5"),
    ({"resolution": {**RAMP, "step": 0}}, "data.resolution.step: must be positive, got 0"),
    ({"resolution": {**RAMP, "step": -32}}, "data.resolution.step: must be positive, got -32"),
    ({"resolution": {"start": 160, "ramp": [2, 6]}}, "data.resolution.end: required"),
    ({"resolution": {**RAMP, "steps": 32}}, "data.resolution.steps: unknown key (allowed: start, end, ramp, step)"),
    ({"resolution": 224}, "data.resolution: expected a mapping, got 224"),
    ({"eval_sizes": [16]}, "data.eval_sizes: must be sizes of at least 32, got [16]"),
    ({"eval_sizes": [256, 256]}, "data.eval_sizes: must be distinct sizes, got [256, 256]"),
    ({"eval_sizes": [256, 224]},
     "data.eval_sizes: 224 is data.img_size, evaluated already: list only the other sizes, got [256, 224]"),
    ({"eval_sizes": 256}, "data.eval_sizes: expected a list, got 256"),
    ({"eval_sizes": [256.5]}, "data.eval_sizes[0]: expected an integer, got 256.5"),
])
def test_bad_resolution_schedules_and_eval_sizes_fail_at_load_in_one_line(tmp_path, data, message):
    recipe = minimal(tmp_path)
    recipe["data"].update(data)
    recipe["train"]["epochs"] = 10
    path = write(tmp_path, recipe)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, check_shards=False)
    assert str(error.value) == f"{path}: {message}"


def test_resolution_and_eval_sizes_from_overrides_dump_and_flatten(tmp_path):
    path = write(tmp_path, minimal(tmp_path))
    sets = ["data.resolution.start=128", "data.resolution.end=192", "data.resolution.ramp=[0, 2]", "data.eval_sizes=[256]"]
    r = load_recipe(path, sets, check_shards=False)
    assert r.data.resolution == ResolutionConfig(start=128, end=192, ramp=(0, 2), step=32)
    assert [r.data.train_size(e) for e in range(3)] == [128, 160, 192] and r.data.val_sizes == (224, 256)
    assert resolve(yaml.safe_load(dump(r)), "printed") == r  # what python -m fatscale.config prints loads back
    assert yaml.safe_load(dump(r))["data"]["resolution"] == {"start": 128, "end": 192, "ramp": [0, 2], "step": 32}
    flat = flatten(to_dict(r))
    assert (flat["data.resolution.start"], flat["data.resolution.ramp"], flat["data.eval_sizes"]) == (128, (0, 2), (256,))
    assert load_recipe(path, sets + ["data.resolution.start=96"], check_shards=False).data.train_size(0) == 96
    assert load_recipe(path, sets + ["data.resolution=null"], check_shards=False).data.resolution is None
    with pytest.raises(RecipeError) as error:
        load_recipe(path, ["data.resolution.start=128"], check_shards=False)
    assert str(error.value) == f"{path}: data.resolution.end: required"
    with pytest.raises(RecipeError) as error:  # a key of a section within a section is checked too
        load_recipe(path, sets + ["train.epochs=2"], check_shards=False)
    assert str(error.value).startswith(f"{path}: data.resolution.ramp: ends at epoch 2, not before train.epochs 2")


def test_an_optional_key_of_the_wrong_type_is_a_recipe_error(tmp_path):
    # An Optional key's one error used to be raised as a bare string (TypeError).
    path = write(tmp_path, minimal(tmp_path))
    with pytest.raises(RecipeError) as error:
        load_recipe(path, ["model.num_classes=ten"], check_shards=False)
    assert str(error.value) == f"{path}: model.num_classes: expected an integer, got 'ten'"


def test_importing_the_schema_imports_neither_torch_timm_nor_dali():
    code = ("import sys, fatscale.config; "
            "print(sorted(m for m in ('torch', 'timm', 'nvidia.dali', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_model_names_fatscale_variants_without_timm_and_timm_models_with_it(tmp_path):
    import timm
    from fatscale.variants import VARIANTS

    assert sorted(VARIANTS) == sorted(timm.list_models("fat_*"))  # the names the check knows are the registered ones
    path = write(tmp_path, minimal(tmp_path))
    assert load_recipe(path, ["model.name=resnet18"], check_shards=False).model.name == "resnet18"


def test_sections_check_themselves_when_made():
    from fatscale.config import AugConfig, DataConfig, SlurmConfig

    with pytest.raises(RecipeError, match=r"^img_size: must be at least 32, got 8$"):
        DataConfig(shards="x", img_size=8)
    with pytest.raises(RecipeError, match=r"^rand_augment: invalid RandAugment string"):
        AugConfig(rand_augment="rand-m9-bogus")
    with pytest.raises(RecipeError, match=r"^tasks_per_node: required when slurm.gpus_per_node is 0"):
        SlurmConfig(gpus_per_node=0)
    with pytest.raises(RecipeError, match=r"^end: must be a multiple of data.resolution.step \(32\), got 230$"):
        ResolutionConfig(start=160, end=230, ramp=(0, 2))
    assert AugConfig(rand_augment="").rand_augment == ""  # off, as null


def test_required_keys(tmp_path):
    with pytest.raises(RecipeError, match=r"model\.name: required"):
        load_recipe(write(tmp_path, {"data": {"shards": "x"}, "train": {"epochs": 1}}), check_shards=False)
    with pytest.raises(RecipeError, match=r"train\.epochs: required"):
        load_recipe(write(tmp_path, {"model": {"name": "fat_b0"}, "data": {"shards": "x"}}), check_shards=False)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="missing.yaml: cannot read"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, minimal(tmp_path))
    r = load_recipe(path, ["train.epochs=7", "optim.betas=[0.8, 0.99]", "aug.rand_augment=null", "model.drop_path=0.2"],
                    check_shards=False)
    assert (r.train.epochs, r.optim.betas, r.aug.rand_augment, r.model.drop_path) == (7, (0.8, 0.99), None, 0.2)
    with pytest.raises(RecipeError, match=r"r\.yaml: train\.epocs: unknown key"):
        load_recipe(path, ["train.epocs=7"], check_shards=False)
    with pytest.raises(RecipeError, match=r"train\.epochs: expected an integer, got 'seven'"):
        load_recipe(path, ["train.epochs=seven"], check_shards=False)
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(path, ["train.epochs"], check_shards=False)
    # PyYAML reads 5e-4 (no dot) as a string: a number where the schema wants one, in overrides and files
    r = load_recipe(path, ["optim.lr=5e-4", "optim.eps=1E-8", "model.drop_path=1.5e-1"], check_shards=False)
    assert (r.optim.lr, r.optim.eps, r.model.drop_path) == (5e-4, 1e-8, 0.15)
    with pytest.raises(RecipeError, match=r"optim\.lr: expected a number, got '5e-4x'"):
        load_recipe(path, ["optim.lr=5e-4x"], check_shards=False)


def test_missing_shard_directory_and_manifest(tmp_path):
    recipe = minimal(tmp_path)
    recipe["data"]["shards"] = str(tmp_path / "nowhere")
    with pytest.raises(RecipeError, match=r"data\.shards: no such directory"):
        load_recipe(write(tmp_path, recipe))
    recipe["data"]["shards"] = str(tmp_path)  # exists, but holds no manifest
    with pytest.raises(RecipeError, match=r"data\.shards: .*manifest"):
        load_recipe(write(tmp_path, recipe))


def test_print_resolved_recipe_command(tmp_path, demo_shards):
    recipe = minimal(tmp_path)
    path = write(tmp_path, recipe)
    command = [sys.executable, "-m", "fatscale.config", str(path), "--set", "train.epochs=5"]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 1  # tmp_path holds no shards: the check fails in one line
    assert out.stderr.strip().count("\n") == 0 and "data.shards" in out.stderr
    recipe["data"]["shards"] = str(demo_shards)
    write(tmp_path, recipe)
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)  # every key, defaults filled in, overrides applied
    assert printed["train"]["epochs"] == 5 and printed["optim"]["lr"] == 5e-4 and printed["tracking"]["run_name"] == "r"
    assert resolve(printed, "printed") == load_recipe(path, ["train.epochs=5"])  # complete and faithful
    flat = flatten(to_dict(load_recipe(path)))
    assert flat["train.epochs"] == 3 and flat["optim.lr"] == 5e-4 and flat["model.name"] == "fat_b0"


def test_recipes_that_cannot_train_on_these_shards_fail_at_load(tmp_path, demo_shards):
    from fatscale.preflight import check_world
    from fatscale.data.manifest import load_manifest

    recipe = minimal(tmp_path)
    recipe["data"]["shards"] = str(demo_shards)  # 8 classes, 480 train samples
    recipe["model"]["num_classes"] = 5
    path = write(tmp_path, recipe)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value) == (f"{path}: model.num_classes: 5 is fewer than the 8 classes of data.shards "
                                f"{demo_shards} (labels up to 7)")
    recipe["model"]["num_classes"] = 1000  # more outputs than classes is allowed (a 1000-class head)
    loaded = load_recipe(write(tmp_path, recipe), ["train.batch_per_device=64"])
    manifest = load_manifest(demo_shards)
    check_world(loaded, manifest, 7, str(path))  # a global batch of 448: one step
    with pytest.raises(RecipeError) as error:
        check_world(loaded, manifest, 8, str(path))  # 512
    assert str(error.value) == (f"{path}: train.batch_per_device: 64 x train.grad_accum 1 on each of 8 ranks is a "
                                "global batch of 512 train samples per step, data.shards has 480: zero steps per epoch")
    with pytest.raises(RecipeError, match="train.grad_accum 2 on each of 7 ranks"):
        check_world(load_recipe(path, ["train.batch_per_device=64", "train.grad_accum=2"]), manifest, 7, str(path))



@pytest.mark.parametrize("content,message", [
    (b"\xff\xfe{}", "not UTF-8 text (byte 0)"),
    (b"[" * 100_000, "not a manifest (nested too deeply)"),
    (b'{"format": "fatscale-shards/1"', "not valid JSON"),
])
def test_a_broken_manifest_is_one_line_naming_it(tmp_path, content, message):
    (tmp_path / "manifest.json").write_bytes(content)
    recipe = minimal(tmp_path)
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, recipe))
    assert str(error.value).startswith(f"{tmp_path / 'r.yaml'}: data.shards: {tmp_path / 'manifest.json'}: ")
    assert message in str(error.value) and "\n" not in str(error.value)

"""Recipes: validation with one-line errors naming file and key, overrides, the shipped recipes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fatscale  # noqa: F401
from fatscale.config import RecipeError, flatten, load_recipe, resolve, to_dict

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
    from fatscale.config import check_world
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
    check_world(loaded, manifest, 7, str(path))  # 480 // 7 = 68 per rank: one batch of 64
    with pytest.raises(RecipeError) as error:
        check_world(loaded, manifest, 8, str(path))  # 60 per rank
    assert str(error.value) == (f"{path}: train.batch_per_device: 64 x train.grad_accum 1 on each of 8 ranks needs at "
                                "least 512 train samples per epoch, data.shards has 480 (60 per rank): zero steps per epoch")
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

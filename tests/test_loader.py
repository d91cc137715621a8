"""DALI loaders (CPU operators) over real shards of real JPEGs made by make_shards."""

import gc
import io
import itertools
import json
import os
import random
import shutil
import struct
import time
import weakref
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

import fatscale  # noqa: F401
from fatscale.data.config import AugConfig, DataConfig, ResolutionConfig
from fatscale.data.loader import TrainLoader, ValLoader, decode_labels, resolve_decode_device
from fatscale.data.manifest import load_manifest
from fatscale.data import rand_augment_spec
from fatscale.data.quarantine import DecodeCheck
from fatscale.data.shard_format import Index, ShardWriter
from fatscale.data.rand_augment import _TIMM_TO_DALI, RandAugmentSpec, rand_augment, warp_interp
from fatscale.prep import make_shards
from conftest import corrupt_copy
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform

NUM_TRAIN = 37  # one image per class, so a label names its sample; uneven over 2 ranks
NUM_VAL = 101
IMG = 32
PLAIN = AugConfig(rand_augment=None, color_jitter=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)


def colour(index: int) -> tuple[int, int, int]:
    """Distinct, JPEG-robust colours: a 5x5x5 grid of levels, index -> (r, g, b)."""
    levels = [20, 70, 120, 170, 220]
    return levels[index % 5], levels[(index // 5) % 5], levels[(index // 25) % 5]


def nearest_colour_index(rgb: np.ndarray, count: int) -> int:
    palette = np.array([colour(i) for i in range(count)], dtype=np.float64)
    return int(np.argmin(((palette - rgb) ** 2).sum(1)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """train: NUM_TRAIN classes x 1 image; val: NUM_VAL classes... both over the same class list
    (class i has colour(i)), so images encode their label visibly."""
    root = tmp_path_factory.mktemp("data")
    num_classes = max(NUM_TRAIN, NUM_VAL)
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        for label in range(num_classes):
            folder = root / "src" / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            if label < count:
                size = (40 + label % 7, 48 - label % 5)  # assorted sizes
                Image.new("RGB", size, colour(label)).save(folder / f"img{label}.JPEG", quality=95)
    make_shards(root / "src", root / "shards", samples_per_shard=10, workers=1, progress=False, log=lambda *a: None)
    return root / "shards"


def data_cfg(shards: Path, **overrides) -> DataConfig:
    return DataConfig(**{"shards": str(shards), "img_size": IMG, "num_threads": 1, **overrides})


def denormalize_mean_rgb(images: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).mean((2, 3)).numpy()


def train_loader(shards: Path, aug: AugConfig = PLAIN, state: dict | None = None, rank: int = 0,
                 world_size: int = 1, batch: int = 4, seed: int = 0, **cfg) -> TrainLoader:
    loader = TrainLoader(load_manifest(shards), data_cfg(shards, **cfg), aug, batch_size=batch, rank=rank,
                         world_size=world_size, seed=seed)
    if state is not None:  # a saved state_dict(), as the Checkpointer restores it
        loader.load_state_dict(state)
    return loader


def test_images_and_labels_stay_aligned_through_augmentation(shards):
    loader = train_loader(shards, AugConfig(rand_augment=None, color_jitter=0.0, reprob=0.0, mixup=0.0, cutmix=0.0,
                                            label_smoothing=0.0, hflip=0.5))
    count = 0
    for _ in range(2):
        for images, labels in loader:
            for rgb, label in zip(denormalize_mean_rgb(images), labels.tolist()):
                assert nearest_colour_index(rgb, max(NUM_TRAIN, NUM_VAL)) == label
                count += 1
    assert count == 2 * (NUM_TRAIN // 4) * 4

    val = ValLoader(load_manifest(shards), data_cfg(shards), batch_size=8)
    for images, labels in val:
        for rgb, label in zip(denormalize_mean_rgb(images), labels.tolist()):
            assert nearest_colour_index(rgb, max(NUM_TRAIN, NUM_VAL)) == label


def test_train_epochs_cover_each_sample_at_most_once_with_equal_steps(shards):
    ranks = [train_loader(shards, rank=r, world_size=2, batch=4) for r in range(2)]
    steps = (NUM_TRAIN // 2) // 4  # floor(floor(37 / 2) / 4) = 4
    assert [len(r) for r in ranks] == [steps, steps]
    epochs = []
    for _ in range(3):
        seen = []
        for loader in ranks:
            batches = list(loader)
            assert len(batches) == steps
            seen += [label for _, labels in batches for label in labels.tolist()]
        assert len(seen) == 2 * steps * 4 == len(set(seen))  # nothing twice in an epoch
        assert set(seen) <= set(range(NUM_TRAIN))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    # Over several epochs the dropped remainder moves: every sample gets seen.
    assert set().union(*map(set, epochs)) == set(range(NUM_TRAIN))


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


READER_SIGNALS_SCRIPT = """
import sys
from pathlib import Path

if __name__ == "__main__":  # DALI's reader processes are spawned: they import this file
    sys.path.insert(0, sys.argv[2])
    from test_loader import train_loader

    batches = iter(loader := train_loader(Path(sys.argv[1]), batch=4))
    first = next(batches)[1].tolist()
    print("ready", flush=True)
    sys.stdin.readline()  # the test has signalled every child of this process
    labels = first + [label for _, batch in batches for label in batch.tolist()]
    print(len(labels), len(set(labels)), flush=True)
"""


def test_reader_processes_leave_stop_signals_to_their_rank(shards, tmp_path):
    """Slurm signals every process of a job step (USR2 before the time limit, TERM), a terminal's
    Ctrl-C the whole process group (INT): the rank stops at a step's end, so its DALI reader
    processes and multiprocessing's resource tracker must not die of them first."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(READER_SIGNALS_SCRIPT)
    rank = subprocess.Popen([sys.executable, str(script), str(shards), str(Path(__file__).parent)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline() == "ready\n", rank.stderr.read()
        children = children_of(rank.pid)
        assert len(children) >= 2  # a reader process and the resource tracker
        for pid in children:
            for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
                os.kill(pid, sig)
        time.sleep(0.5)
        assert all(Path(f"/proc/{pid}").exists() for pid in children)
        out, err = rank.communicate("go\n", timeout=120)
    finally:
        rank.kill()
    steps = NUM_TRAIN // 4
    assert rank.returncode == 0 and out.split() == [str(4 * steps)] * 2, err
    assert "resource_tracker" not in err


def test_val_counts_every_sample_exactly_once_over_ranks(shards):
    labels = []
    for rank in range(2):
        loader = ValLoader(load_manifest(shards), data_cfg(shards), batch_size=8, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        labels += [label for _, y in batches for label in y.tolist()]
        assert len(list(loader)) == len(batches)  # a second pass gives the same count
    assert sorted(labels) == list(range(NUM_VAL))


def test_shapes_dtypes_and_normalization(shards):
    val = ValLoader(load_manifest(shards), data_cfg(shards, channels_last=False), batch_size=8)
    images, labels = next(iter(val))
    assert images.shape == (8, 3, IMG, IMG) and images.dtype == torch.float32 and images.is_contiguous()
    assert labels.dtype == torch.int64
    # A uniform image normalises to ((c / 255) - mean) / std in every pixel.
    expected = (torch.tensor([colour(l) for l in labels.tolist()]) / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(images.mean((2, 3)), expected.float(), atol=0.06, rtol=0)
    assert images.std((2, 3)).max() < 0.05

    train = train_loader(shards, AugConfig(rand_augment=None, reprob=0.0, label_smoothing=0.1), batch=4)
    images, targets = next(iter(train))
    assert images.shape == (4, 3, IMG, IMG) and images.is_contiguous(memory_format=torch.channels_last)
    assert targets.shape == (4, NUM_VAL) and targets.dtype == torch.float32  # soft targets
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets.min() >= 0.1 / NUM_VAL - 1e-6  # label smoothing spreads mass everywhere


def run_epochs(loader: TrainLoader, epochs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for _ in range(epochs) for x, y in loader]


def seed_host_rngs() -> None:
    # Random erasing and Mixup draw from Python's, NumPy's and torch's generators (the trainer
    # seeds them and saves their states).
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def test_same_seed_same_batches_other_seed_other_batches(shards):
    aug = AugConfig(rand_augment=None, color_jitter=0.4, reprob=0.25)
    seed_host_rngs()
    first = run_epochs(train_loader(shards, aug), 1)
    seed_host_rngs()
    second = run_epochs(train_loader(shards, aug), 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    seed_host_rngs()
    other = run_epochs(train_loader(shards, aug, seed=1), 1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_resume_mid_epoch_continues_exactly(shards):
    """With RandAugment on: the restored pipeline repeats reader order and every random op."""
    aug = AugConfig(reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
    reference = run_epochs(train_loader(shards, aug), 2)

    loader = train_loader(shards, aug)
    it = iter(loader)
    before = [next(it) for _ in range(6)]  # epoch 0 has 9 steps: stop inside epoch 0
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (0, 6)
    resumed = train_loader(shards, aug, state=state)
    after = run_epochs(resumed, 2)  # the rest of epoch 0, then epoch 1
    got = before + after
    assert len(got) == len(reference)
    for (x, y), (rx, ry) in zip(got, reference):
        assert torch.equal(y, ry)
        assert torch.equal(x, rx)


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(y, ey) and torch.equal(x, ex)


def test_state_dict_round_trip_mid_epoch_gives_the_same_following_batches(shards):
    """load_state_dict of a state that went through JSON, in a new loader and in the loader that ran
    on past it: both continue with the batches that followed (RandAugment on)."""
    aug = AugConfig(reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
    loader = train_loader(shards, aug)
    it = iter(loader)
    for _ in range(4):  # of 9 steps in epoch 0
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    following = [(x.clone(), y.clone()) for x, y in it] + run_epochs(loader, 1)  # the rest of epoch 0, epoch 1
    fresh = train_loader(shards, aug)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state and (state["epoch"], state["step"]) == (0, 4)
    assert_same_batches(run_epochs(fresh, 2), following)
    loader.load_state_dict(state)  # back to step 4 of epoch 0, from epoch 2
    assert_same_batches(run_epochs(loader, 2), following)
    with pytest.raises(ValueError, match="step 10 of an epoch of 9 steps"):
        fresh.load_state_dict({**state, "step": 10})


# Progressive resolution: 32 px for epochs 0-1, the ramp's 48 in epoch 2, 64 from epoch 3 on.
RAMP = ResolutionConfig(start=32, end=64, ramp=(1, 3), step=16)
RAMP_SIZES = [32, 32, 48, 64]
RAMP_AUG = AugConfig(reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)  # RandAugment on: draws show


def sized_epochs(loader: TrainLoader, epochs: int) -> tuple[list[int], list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """The loader's img_size at the start of each epoch, and each epoch's batches."""
    sizes, batches = [], []
    for _ in range(epochs):
        sizes.append(loader.img_size)
        batches.append(run_epochs(loader, 1))
    return sizes, batches


@pytest.fixture(scope="module")
def ramp_run(shards):
    """RAMP over len(RAMP_SIZES) epochs, uninterrupted: the reference of the tests below."""
    return sized_epochs(train_loader(shards, RAMP_AUG, resolution=RAMP), len(RAMP_SIZES))


def test_the_resolution_schedule_sets_each_epoch_s_train_size(ramp_run):
    assert [RAMP.train_size(e) for e in range(6)] == RAMP_SIZES + [64, 64]
    sizes, epochs = ramp_run
    assert sizes == RAMP_SIZES
    for size, batches in zip(RAMP_SIZES, epochs):
        assert len(batches) == NUM_TRAIN // 4
        assert {tuple(x.shape) for x, _ in batches} == {(4, 3, size, size)}
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)


def test_a_size_change_keeps_reader_order_and_random_draws(shards, ramp_run):
    """The pipeline rebuilt for a new size restores DALI's checkpoint: the samples and every random
    draw (crop, flip, RandAugment) are those of a run at that size all along. (A pipeline started
    afresh at the new size would repeat epoch 0's order and draws.)"""
    _, epochs = ramp_run
    for size in sorted(set(RAMP_SIZES) - {RAMP.start}):
        last = max(e for e, s in enumerate(RAMP_SIZES) if s == size)
        constant = sized_epochs(train_loader(shards, RAMP_AUG, img_size=size), last + 1)[1]
        for e in range(last + 1):
            assert [y.tolist() for _, y in epochs[e]] == [y.tolist() for _, y in constant[e]]  # same order
            if RAMP_SIZES[e] == size:
                assert_same_batches(epochs[e], constant[e])  # bitwise: same draws


@pytest.mark.parametrize("epochs,steps", [
    (1, 9),  # every batch of the epoch before the change handed out, the epoch not yet ended
    (2, 0),  # at the boundary: the state a trainer saves at the end of epoch 1
    (2, 1),  # just after the change, at 48 px (mid-epoch at a constant size: test_resume_mid_epoch_...)
])
def test_resume_anywhere_on_the_ramp_continues_exactly(shards, ramp_run, epochs, steps):
    """Stopped after ``epochs`` epochs and ``steps`` batches, saved, and resumed in a new loader:
    the batches are bitwise those of the uninterrupted run, at each epoch's size."""
    _, reference = ramp_run
    loader = train_loader(shards, RAMP_AUG, resolution=RAMP)
    before = run_epochs(loader, epochs)
    before += [(x.clone(), y.clone()) for x, y in itertools.islice(iter(loader), steps)]
    state = json.loads(json.dumps(loader.state_dict()))
    assert (state["epoch"], state["step"]) == (epochs, steps)
    resumed = train_loader(shards, RAMP_AUG, state=state, resolution=RAMP)
    assert resumed.img_size == RAMP_SIZES[epochs]
    after = run_epochs(resumed, len(RAMP_SIZES) - epochs)  # the rest of this epoch, then the others
    assert_same_batches(before + after, [batch for epoch in reference for batch in epoch])


def test_the_pipeline_of_the_old_size_is_released_at_the_size_change(shards):
    """Dropped when the epoch before the change ends, before the evaluation that follows it (its
    memory then handed back: ReleaseUnusedMemory); kept where the size stays."""
    loader = train_loader(shards, resolution=RAMP)
    gc.disable()  # freed by its reference count as it is dropped, not by some later collection
    try:
        run_epochs(loader, 1)
        first = weakref.ref(loader._it._pipes[0])
        run_epochs(loader, 1)  # epoch 1: still 32 px, on the same pipeline
        assert loader.img_size == 48 and loader._it is None and first() is None
    finally:
        gc.enable()
    assert {tuple(x.shape) for x, _ in run_epochs(loader, 1)} == {(4, 3, 48, 48)}


def test_val_pipeline_lives_only_through_a_pass_and_passes_are_identical(shards):
    """Built when an evaluation starts, released when it ends (or is left unfinished): nothing is
    held through the training epochs. Every pass gives the same batches, bitwise."""
    val = ValLoader(load_manifest(shards), data_cfg(shards), batch_size=8)
    assert val._it is None
    passes = []
    gc.disable()
    try:
        for _ in range(2):
            batches = []
            for x, y in val:
                batches.append((x.clone(), y.clone()))
                pipe = weakref.ref(val._it._pipes[0])
            assert val._it is None and pipe() is None
            passes.append(batches)
        it = iter(val)
        next(it)
        pipe = weakref.ref(val._it._pipes[0])
        it.close()
        assert val._it is None and pipe() is None
    finally:
        gc.enable()
    assert len(passes[0]) == len(val)
    assert_same_batches(passes[1], passes[0])
    assert_same_batches([(x.clone(), y.clone()) for x, y in val], passes[0])  # after the unfinished pass


def test_val_at_two_sizes_gives_those_sizes_and_the_same_samples(shards):
    cfg = data_cfg(shards, eval_sizes=(48,))
    assert cfg.val_sizes == (IMG, 48)
    loaders = [ValLoader(load_manifest(shards), cfg, batch_size=8, img_size=size) for size in cfg.val_sizes]
    assert ValLoader(load_manifest(shards), cfg, batch_size=8).img_size == IMG  # default: data.img_size
    results = []
    for size, loader in zip(cfg.val_sizes, loaders):
        batches = list(loader)
        assert {tuple(x.shape[1:]) for x, _ in batches} == {(3, size, size)}
        labels = [label for _, y in batches for label in y.tolist()]
        assert sorted(labels) == list(range(NUM_VAL))  # every sample once
        for x, y in batches:
            for rgb, label in zip(denormalize_mean_rgb(x), y.tolist()):
                assert nearest_colour_index(rgb, NUM_VAL) == label
        results.append(labels)
    assert results[0] == results[1]  # in the same order
    with pytest.raises(ValueError, match="val img_size 16: must be at least 32"):
        ValLoader(load_manifest(shards), cfg, batch_size=8, img_size=16)


def test_rand_augment_spec_follows_timm():
    spec = RandAugmentSpec("rand-m9-mstd0.5-inc1")
    assert spec.num_layers == 2 and spec.prob == 0.5
    assert (spec.magnitude, spec.magnitude_std, spec.magnitude_max) == (9.0, 0.5, 10.0)
    assert "PosterizeIncreasing" in spec.op_names and "SolarizeAdd" in spec.op_names and len(spec.op_names) == 15
    assert "Posterize" in RandAugmentSpec("rand-m7-n3").op_names  # inc0 set
    assert RandAugmentSpec("rand-m7-n3").num_layers == 3
    with pytest.raises(ValueError, match="rand-m9-bogus"):
        RandAugmentSpec("rand-m9-bogus")


@pytest.mark.parametrize("config", [
    "rand-m9-mstd0.5-inc1", "rand-m7-n3", "rand-m9-n1-p1.0", "rand-mstd101-inc1", "rand-m5-mmax8-inc0", "rand-mmax0",
    "rand-m9-mstd0.5-mstd2-m3-n4-inc1-inc0-p0.3", "rand-mmax7-mmax9-m8", "rand-tfoo-m2-inc1", "rand-n0"])
def test_rand_augment_spec_parses_as_timm(config):
    """fatscale.data.rand_augment_spec parses without timm: the same layers, ops and magnitudes."""
    spec, timm_ra = RandAugmentSpec(config), rand_augment_transform(config, {})
    first = timm_ra.ops[0]
    assert (spec.op_names, spec.num_layers) == ([op.name for op in timm_ra.ops], timm_ra.num_layers)
    assert (spec.prob, spec.magnitude, spec.magnitude_std, spec.magnitude_max) == (
        first.prob, first.magnitude, first.magnitude_std, first.magnitude_max or 10)
    assert all((op.prob, op.magnitude, op.magnitude_std) == (first.prob, first.magnitude, first.magnitude_std)
               for op in timm_ra.ops)


@pytest.mark.parametrize("config,message", [
    ("rand-m9.5", "invalid RandAugment string 'rand-m9.5': ValueError "),
    ("rand-mmax5.5", "invalid RandAugment string 'rand-mmax5.5': ValueError "),
    ("rand-t3a", "no DALI equivalent for timm ops ['Desaturate', 'GaussianBlur']"),
    ("rand-tweights", "weighted op choice ('w' option) is not supported"),
    ("rand-m9-t3aw", "weighted op choice ('w' option) is not supported"),
    ("rand-mmax12", "magnitude max above 10.0 has no DALI range"),
    ("rand-m9-msdt0.5", "bad sections ['msdt0.5']"),
    ("rnd-m9", "expected rand-<section>-..."),
])
def test_rand_augment_spec_refuses_what_dali_cannot_run(config, message):
    with pytest.raises(ValueError) as error:
        RandAugmentSpec(config)
    assert message in str(error.value)
    if "ValueError" in message:  # timm fails on it too, with the same words
        with pytest.raises(ValueError) as timm_error:
            rand_augment_transform(config, {})
        assert str(error.value).endswith(str(timm_error.value))
    elif "weighted" in message:
        assert rand_augment_transform(config, {}).choice_weights is not None


def test_rand_augment_runs_every_op_the_spec_accepts():
    assert set(_TIMM_TO_DALI) == rand_augment_spec.DALI_OPS


def test_rand_augment_changes_some_images(shards):
    aug = AugConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
    plain = AugConfig(rand_augment=None, color_jitter=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                      reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
    changed = []
    for (x, y), (px, py) in zip(run_epochs(train_loader(shards, aug), 2), run_epochs(train_loader(shards, plain), 2)):
        assert torch.equal(y, py)  # same reader order: augmentation is the only difference
        changed += ((x - px).abs().amax((1, 2, 3)) > 0.1).tolist()
    # Each of 2 layers applies an op with p=0.5 (some ops, e.g. a small translation of a uniform
    # image, change little): some images change, some do not.
    assert 0.3 < sum(changed) / len(changed) < 0.95


def test_rand_augment_warp_interpolation():
    """Geometric ops only, always applied, on black/white checkerboards: nearest-neighbour warps
    (``auto`` on CPU operators) yield only the input levels and the grey fill; bilinear ones blend."""
    spec = RandAugmentSpec("rand-m9-n1-p1.0")  # also a fixed magnitude (no mstd)
    spec.op_names = ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
    board = (np.indices((48, 48)).sum(0) // 3 % 2 * 255).astype(np.uint8)
    boards = [np.repeat(board[:, :, None], 3, axis=2)] * 16

    @pipeline_def(enable_conditionals=True, batch_size=16, num_threads=1, device_id=None, seed=3)
    def warped(interp: str):
        images = fn.external_source(source=lambda: boards, batch=True, layout="HWC")
        return rand_augment(images, spec, shape=(48, 48), interp=interp)

    def levels(interp: str) -> set[int]:
        pipe = warped(interp)
        pipe.build()
        out = np.stack([np.array(pipe.run()[0].at(i)) for i in range(16)])
        assert (out != boards).any(axis=(1, 2, 3)).all()  # every image was warped
        return set(np.unique(out).tolist())

    assert levels("auto") == levels("nearest") == {0, 128, 255}
    assert len(levels("linear")) > 3
    assert warp_interp("auto", "gpu") == types.INTERP_LINEAR


def test_decode_device_choice():
    assert resolve_decode_device("auto", torch.device("cpu")) == "cpu"
    assert resolve_decode_device("auto", torch.device("cuda", 0)) == "mixed"
    assert resolve_decode_device("cpu", torch.device("cuda", 0)) == "cpu"
    with pytest.raises(ValueError, match="mixed"):
        resolve_decode_device("mixed", torch.device("cpu"))
    with pytest.raises(ValueError, match="gpu"):  # a bad setting: DataConfig refuses it
        DataConfig(shards="x", decode_device="gpu")


def test_decode_labels():
    raw = torch.zeros(3, 8, dtype=torch.uint8)
    for row, text in enumerate(["0", "7", "999"]):
        raw[row, : len(text)] = torch.tensor(list(text.encode()))
    assert decode_labels(raw).tolist() == [0, 7, 999]
    raw[0, 0] = ord("x")
    with pytest.raises(ValueError):
        decode_labels(raw)


def test_batch_too_large_for_the_split_fails_clearly(shards):
    with pytest.raises(ValueError, match="37 train samples cannot fill one global batch of 64"):
        train_loader(shards, batch=32, world_size=2)


def test_corrupt_train_image_is_quarantined_and_training_goes_on(shards, tmp_path):
    bad_label = 5
    key = corrupt_copy(shards, tmp_path / "corrupt", "train", bad_label)
    clean = run_epochs(train_loader(shards), 2)
    loader = train_loader(tmp_path / "corrupt")
    got = run_epochs(loader, 2)
    assert [(q.key, q.shard.startswith("train-")) for q in loader.quarantine] == [(key, True)]
    assert loader.quarantine[0].reason.startswith("DALI cpu decoder: ")
    assert len(got) == len(clean)
    for (x, y), (cx, cy) in zip(got, clean):
        assert x.shape == cx.shape  # full batches
        same = cy != bad_label
        assert torch.equal(y[same], cy[same])  # the run continued exactly where it was
        assert torch.equal(x[same], cx[same])
        assert bad_label not in y.tolist()  # its slot holds a neighbour, with the neighbour's label
        for rgb, label in zip(denormalize_mean_rgb(x), y.tolist()):
            assert nearest_colour_index(rgb, max(NUM_TRAIN, NUM_VAL)) == label
    # The quarantine travels with the loader state: a resumed run does not hit the sample again.
    state = loader.state_dict()
    assert state["quarantine"] == [loader.quarantine[0].to_dict()]
    resumed = train_loader(tmp_path / "corrupt", state=state)
    assert resumed.quarantine == loader.quarantine
    resumed_labels = [label for _, y in run_epochs(resumed, 1) for label in y.tolist()]
    assert len(resumed_labels) == len(resumed) * 4 and bad_label not in resumed_labels


def test_corrupt_val_image_is_left_out_and_reported(shards, tmp_path):
    key = corrupt_copy(shards, tmp_path / "corrupt", "val", 42)
    labels, quarantined = [], []
    for rank in range(2):
        loader = ValLoader(load_manifest(tmp_path / "corrupt"), data_cfg(tmp_path / "corrupt"), batch_size=8,
                           rank=rank, world_size=2)
        labels += [label for _, y in loader for label in y.tolist()]
        quarantined += [q.key for q in loader.quarantine]
    assert quarantined == [key]
    assert sorted(labels) == [label for label in range(NUM_VAL) if label != 42]


def test_a_sample_only_the_dali_decoder_rejects_is_quarantined(shards, tmp_path):
    # The check must use the pipeline's decoder: PIL decodes this one, so a PIL check would find
    # nothing ahead and the run would stop.
    key = corrupt_copy(shards, tmp_path / "corrupt", "train", 9, how="junk")
    loader = train_loader(tmp_path / "corrupt")
    labels = [label for _, y in run_epochs(loader, 1) for label in y.tolist()]
    assert [q.key for q in loader.quarantine] == [key] and 9 not in labels
    assert loader.quarantine[0].reason.startswith("DALI cpu decoder: ")


def replace_jpeg(shards: Path, dest: Path, split: str, label: int, jpeg: bytes) -> str:
    """Copy ``shards`` to ``dest`` with ``jpeg`` as the JPEG of the ``split`` sample of class
    ``label`` (its tar and index rewritten); returns its key."""
    shutil.copytree(shards, dest)
    for index_path in sorted(dest.glob(f"{split}-*.idx")):
        tar = index_path.with_suffix(".tar")
        data = tar.read_bytes()
        samples = [(s[0].key, {m.ext: data[m.offset:m.offset + m.size] for m in s})
                   for s in Index.parse(index_path.read_text()).samples]
        for key, members in samples:
            if int(members["cls"]) == label:
                members["jpg"] = jpeg
                writer = ShardWriter(tar)
                for sample in samples:
                    writer.write(sample[0], sample[1].items())
                writer.finish()
                index_path.write_text(writer.index_text())
                return key
    raise AssertionError(f"no {split} sample of class {label}")


def lying_jpeg() -> bytes:
    """An 8 x 200 px JPEG with a second frame header (SOF0) that only nvImageCodec's parser reads,
    in a comment after a parameterless TEM marker: libjpeg skips the next two bytes as junk (a
    warning), the parser reads them as a segment length that lands it on the comment's text. DALI
    decodes into the size it says, 9 x 177 px: no more pixels than the image has, so the
    whole-image decoder fills it (garbled, no error); but too wide for any crop window of 8% of its
    area at an aspect ratio within 4/3, so the random crop's window is all 9 rows, one more than
    the image has: libjpeg-turbo refuses it, and so does the OpenCV decoder nvImageCodec falls back to."""
    encoded = io.BytesIO()
    Image.new("RGB", (200, 8), colour(11)).save(encoded, "JPEG", quality=95)
    jpeg = encoded.getvalue()
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, 9, 177, 3) + bytes.fromhex("011100021100031100")
    comment = b"\xff\xfe" + struct.pack(">H", 2 + len(sof)) + sof
    sos = jpeg.index(b"\xff\xda")
    return jpeg[:sos] + b"\xff\x01" + struct.pack(">H", 6) + comment + jpeg[sos:]


def test_a_sample_only_the_random_crop_decoder_rejects_is_quarantined(shards, tmp_path):
    """The check decodes with the train pipeline's own decoder (the random-crop one): a check with
    the whole-image decoder passes this sample, finds nothing ahead, and the run stops."""
    jpeg = lying_jpeg()
    whole = partial(fn.decoders.image, device="cpu", output_type=types.RGB)
    assert DecodeCheck("cpu", None, [whole]).reason(jpeg) is None
    key = replace_jpeg(shards, tmp_path / "lying", "train", 11, jpeg)
    loader = train_loader(tmp_path / "lying")
    labels = [label for _, y in run_epochs(loader, 1) for label in y.tolist()]
    assert [q.key for q in loader.quarantine] == [key] and 11 not in labels
    assert loader.quarantine[0].reason.startswith("DALI cpu decoder: ")


def test_patched_index_directory_goes_with_the_loader(shards, tmp_path):
    corrupt_copy(shards, tmp_path / "corrupt", "val", 7)
    loader = ValLoader(load_manifest(tmp_path / "corrupt"), data_cfg(tmp_path / "corrupt"), batch_size=8)
    assert len([label for _, y in loader for label in y.tolist()]) == NUM_VAL - 1
    (patched,) = {Path(p).parent for p in loader._current_index_paths()} - {Path(p).parent for p in loader.index_paths}
    assert patched.is_dir() and patched.name.startswith("fatscale-index-")
    del loader
    gc.collect()
    assert not patched.exists()

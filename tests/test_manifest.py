"""manifest.json as fatscale.data.manifest reads it: checked by the schema engine (fatscale.schema),
every problem one line naming the file and the field; what the writer writes reads back equal."""

import json

import pytest

from fatscale.data.manifest import FORMAT, Manifest, ManifestError, ShardInfo, SkippedFile, SplitInfo, load_manifest, \
    write_manifest

SHARD = {"path": "train-000000.tar", "index": "train-000000.idx", "num_samples": 2, "bytes": 3072, "sha256": "0" * 64}


def split(**fields) -> dict:
    return {"num_samples": 2, "num_source_files": 2, "shards": [SHARD], **fields}


def manifest(**fields) -> dict:
    return {"format": FORMAT, "classes": ["a", "b"], "splits": {"train": split()}, **fields}


@pytest.mark.parametrize("content,message", [
    (manifest(classes="ab"), "classes: expected a list, got 'ab'"),
    (manifest(classes=["a", "a"]), "classes: must be a non-empty list of distinct class names"),
    (manifest(class_names=["x"]), "class_names: must be a list of 2 strings, one per class"),
    (manifest(splits={}), "splits: must be a non-empty mapping of splits"),
    (manifest(splits={"train": split(num_samples=3, num_source_files=3)}),
     "splits.train: num_samples is 3 but its shards hold 2"),
    (manifest(splits={"train": split(num_source_files=1)}),
     "splits.train: num_source_files is 1 but num_samples + skipped is 2"),
    (manifest(splits={"train": split(shards=[{**SHARD, "path": "../x.tar"}])}),
     "splits.train.shards[0].path: must be relative to the shard directory, got '../x.tar'"),
    (manifest(splits={"train": split(shards=[{**SHARD, "sha256": "xyz"}])}),
     "splits.train.shards[0].sha256: must be 64 hex digits, got 'xyz'"),
    (manifest(splits={"train": split(shards=[{**SHARD, "bytes": True}])}),
     "splits.train.shards[0].bytes: expected an integer, got True"),
    (manifest(splits={"train": split(shards=[{**SHARD, "extra": 1}])}),
     "splits.train.shards[0].extra: unknown key"),
    (manifest(splits={"train": split(), "val": split()}), "splits: shard 'train-000000.tar' is listed twice"),
    (manifest(splits={"train": split(skipped=[{"path": "x.JPEG"}], num_source_files=3)}),
     "splits.train.skipped[0].reason: required"),
    (manifest(format="fatscale-shards/0"), "format is 'fatscale-shards/0', expected 'fatscale-shards/1'"),
    ([], "not a manifest (the top level is not an object)"),
])
def test_a_bad_manifest_is_one_line_naming_the_field(tmp_path, content, message):
    (tmp_path / "manifest.json").write_text(json.dumps(content))
    with pytest.raises(ManifestError) as error:
        load_manifest(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'manifest.json'}: {message}"), str(error.value)
    assert "\n" not in str(error.value)


def test_what_is_written_reads_back_equal(tmp_path):
    written = Manifest(classes=["a", "b"], class_names=["apple", "bee"], params={"quality": 95},
                       splits={"train": SplitInfo(num_samples=2, num_source_files=3, shuffled=True,
                                                  shards=[ShardInfo(**SHARD)],
                                                  skipped=[SkippedFile("train/a/x.txt", "not an image file")],
                                                  changes={"grayscale JPEG": 1})})
    write_manifest(tmp_path, written)
    assert load_manifest(tmp_path) == written
    raw = json.loads((tmp_path / "manifest.json").read_text())
    del raw["class_names"]  # absent: the classes are their own names
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert load_manifest(tmp_path).class_names == ["a", "b"]

"""fatscale.data.shard_format: the tar + DALI index format, and the quarantine built on it.

End to end (TarWriter's bytes, wds2idx's index, DALI and webdataset reading the shards) it is
tested in test_make_shards.py; here the index as data.
"""

from __future__ import annotations

import pytest

from fatscale.data.shard_format import Index, Member, ShardWriter, index_from_tar


def write_shard(path, samples: dict[str, bytes]) -> ShardWriter:
    with ShardWriter(path) as w:
        for key, jpg in samples.items():
            w.write(key, [("json", b'{"k":"%s"}' % key.encode()), ("cls", b"1"), ("jpg", jpg)])
        w.finish()
    return w


def test_the_writers_index_is_the_tars_and_parses_back(tmp_path):
    samples = {f"{i:08d}_x": bytes([i]) * (100 + 300 * i) for i in range(4)}
    w = write_shard(tmp_path / "s.tar", samples)
    text = w.index_text()
    assert text == index_from_tar(tmp_path / "s.tar")
    assert text.splitlines()[0] == "v1.2 4" and w.num_samples == 4
    index = Index.parse(text)
    assert index.text() == text
    data = (tmp_path / "s.tar").read_bytes()
    for (key, jpg), sample in zip(samples.items(), index.samples):
        assert [m.ext for m in sample] == ["cls", "jpg", "json"]  # TarWriter's order
        assert {m.key for m in sample} == {key}
        jpg_member = sample[1]
        assert data[jpg_member.offset:jpg_member.offset + jpg_member.size] == jpg
        assert index.member_at(jpg_member.offset) == jpg_member
    assert index.member_at(1) is None


def test_parse_passes_over_blank_lines_and_keeps_the_header():
    index = Index.parse("v1.2 1\n\njpg 512 3 a.jpg cls 1536 1 a.cls\n\n")
    assert index.samples == [(Member("jpg", 512, 3, "a.jpg"), Member("cls", 1536, 1, "a.cls"))]
    assert index.text() == "v1.2 1\njpg 512 3 a.jpg cls 1536 1 a.cls\n"


def test_quarantine_reads_members_and_patches_the_index(tmp_path):
    pytest.importorskip("nvidia.dali")
    from fatscale.data.quarantine import read_member, write_patched_index

    samples = {f"{i:08d}_x": bytes([65 + i]) * (10 + i) for i in range(4)}
    write_shard(tmp_path / "s.tar", samples)
    (tmp_path / "s.idx").write_text(index_from_tar(tmp_path / "s.tar"))
    index = Index.parse((tmp_path / "s.idx").read_text())
    for jpg, sample in zip(samples.values(), index.samples):
        assert read_member(str(tmp_path / "s.tar"), sample[1].offset, str(tmp_path / "s.idx")) == jpg
    with pytest.raises(RuntimeError, match="no member at offset 3"):
        read_member(str(tmp_path / "s.tar"), 3, str(tmp_path / "s.idx"))

    (tmp_path / "patched").mkdir()
    bad = {"00000000_x": "undecodable", "00000002_x": "undecodable"}
    path = write_patched_index(str(tmp_path / "s.idx"), bad, tmp_path / "patched")
    patched = Index.parse(open(path).read())
    assert [s[0].key for s in patched.samples] == list(samples)  # same keys, same count
    donors = {0: 1, 1: 1, 2: 1, 3: 3}  # the nearest earlier healthy sample, else the first later one
    for i, j in donors.items():
        assert [(m.offset, m.size) for m in patched.samples[i]] == [(m.offset, m.size) for m in index.samples[j]]
    with pytest.raises(RuntimeError, match="every sample is undecodable"):
        write_patched_index(str(tmp_path / "s.idx"), dict.fromkeys(samples, "x"), tmp_path / "patched")

"""The shard reader on damaged and unusual shards: each bad sample skipped, counted and logged by key; good ones kept
(bytes after an image's end, brace patterns); clipfast.evaluate's meta.json found however the shards are named."""
import io
import json
import logging
import tarfile

import numpy as np
import pytest

from clipfast.data import ShardReader, list_shards, write_shard
from clipfast.data.demo import digit_jpeg
from clipfast.data.shards import ShardError, brace_expand, image_problem, tar_files
from clipfast.evaluate import dataset_meta

GOOD = digit_jpeg(np.eye(8) * 16, 32)


def _read(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):
        reader = ShardReader(list_shards(str(tmp_path)), loop=False, shuffle_buffer=0)
        return [(s.key, s.caption) for s in reader], reader.skipped


def test_a_cut_shards_last_sample_is_dropped_not_read_without_its_json(tmp_path, caplog):
    """The shard ends inside the third sample's .json: its image and caption are whole, its label is not; it is
    skipped and counted as incomplete (it used to come out with meta {} and fail the evaluation)."""
    samples = [{"__key__": f"s{i}", "jpg": GOOD, "txt": f"digit {i}", "json": {"label": i}} for i in range(3)]
    write_shard(tmp_path / "full.tar", samples)
    data = (tmp_path / "full.tar").read_bytes()
    names = [n for n, _ in tar_files(data)]
    assert names[-1] == "s2.json"
    cut = data.rfind(b"s2.json")  # inside the header of s2's .json, so s2.jpg and s2.txt are whole
    (tmp_path / "full.tar").unlink()
    (tmp_path / "cut.tar").write_bytes(data[:cut + 100])
    got, skipped = _read(tmp_path, caplog)
    assert got == [("s0", "digit 0"), ("s1", "digit 1")]
    assert skipped == {"incomplete sample": 1}  # one sample lost, one count
    assert "'s2'" in caplog.text and "cut.tar" in caplog.text and "after 3 keys" in caplog.text


def test_duplicate_keys_non_object_json_and_captions_empty_once_cleaned_are_skipped_by_key(tmp_path, caplog):
    write_shard(tmp_path / "a.tar", [
        {"__key__": "dup", "jpg": GOOD, "txt": "first"},
        {"__key__": "ok", "jpg": GOOD, "txt": "fine"},
        {"__key__": "dup", "jpg": GOOD, "txt": "second", "json": {"label": 1}},  # not contiguous with the first
        {"__key__": "twice", "jpg": GOOD, "txt": "one"},
        {"__key__": "twice", "jpg": GOOD, "txt": "two"},  # contiguous: its .jpg repeats
        {"__key__": "nulljson", "jpg": GOOD, "txt": "x", "json": "null"},
        {"__key__": "listjson", "jpg": GOOD, "txt": "x", "json": "[1, 2]"},
        {"__key__": "nbsp", "jpg": GOOD, "txt": "&nbsp; \x01"},  # nothing left once cleaned as the tokenizer does
        {"__key__": "bang", "jpg": GOOD, "txt": "!!"},  # no letter, but text: kept
    ])
    got, skipped = _read(tmp_path, caplog)
    assert got == [("dup", "first"), ("ok", "fine"), ("twice", "one"), ("bang", "!!")]  # the first of each, whole
    assert skipped == {"duplicate key": 2, "metadata .json is not an object": 2, "empty caption": 1}
    for key in ("'dup'", "'twice'", "'nulljson'", "'listjson'", "'nbsp'"):
        assert key in caplog.text


def _with_exif_thumbnail(jpeg: bytes) -> bytes:
    """jpeg with an APP1 segment after its SOI that holds a whole small JPEG (end marker included), as EXIF
    thumbnails do."""
    thumb = b"Exif\0\0" + GOOD
    return jpeg[:2] + b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb + jpeg[2:]


def test_image_end_markers_bytes_after_them_allowed_a_cut_scan_still_caught():
    assert image_problem(GOOD) is None
    assert image_problem(GOOD + b"\0" * 5000) is None  # padding / a motion photo's video after the end marker
    exif = _with_exif_thumbnail(GOOD)
    assert image_problem(exif) is None
    cut = exif[: len(exif) - 200]  # the main scan cut: the thumbnail's end marker must not pass for its own
    assert cut.count(b"\xff\xd9") == 1 and "truncated" in image_problem(cut)
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "PNG")
    png = buf.getvalue()
    assert image_problem(png) is None and image_problem(png + b"\0" * 3000) is None
    assert "truncated" in image_problem(png[:-12] + b"\0" * 100)



def _png_with_text() -> bytes:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "made for a test")
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def _flip_crc(png: bytes, kind: bytes) -> bytes:
    at = png.index(kind) - 4  # the chunk's length field
    end = at + 12 + int.from_bytes(png[at:at + 4], "big")
    return png[:end - 1] + bytes([png[end - 1] ^ 0xFF]) + png[end:]


def test_a_png_whose_critical_chunk_fails_its_crc_is_skipped_before_the_decoder(tmp_path, caplog):
    """DALI's libpng refuses a PNG whose IDAT CRC is wrong (its error stopped the run: PIL's load(), the recovery's
    check, does not look at CRCs); the reader skips it by key before it gets there. An ancillary chunk's bad CRC
    (tEXt), which libpng only warns about, passes."""
    from PIL import Image

    png = _png_with_text()
    assert image_problem(png) is None
    bad_idat, bad_text = _flip_crc(png, b"IDAT"), _flip_crc(png, b"tEXt")
    with Image.open(io.BytesIO(bad_idat)) as im:
        im.load()  # (PIL decodes it)
    assert image_problem(bad_idat).startswith("PNG IDAT chunk fails its CRC (at byte ")
    assert "IHDR chunk fails" in image_problem(_flip_crc(png, b"IHDR"))
    assert image_problem(bad_text) is None
    long = png.index(b"IDAT") - 4  # a length that runs past the end
    assert "runs past the end" in image_problem(png[:long] + b"\x7f\xff\xff\xff" + png[long + 4:])
    write_shard(tmp_path / "a.tar", [{"__key__": "crc", "png": bad_idat, "txt": "red"},
                                     {"__key__": "text", "png": bad_text, "txt": "red"},
                                     {"__key__": "ok", "png": png, "txt": "red"}])
    got, skipped = _read(tmp_path, caplog)
    assert [k for k, _ in got] == ["text", "ok"] and skipped == {"PNG IDAT chunk fails its CRC": 1}
    assert "'crc'" in caplog.text


def test_a_shard_cut_inside_a_samples_first_file_keeps_the_sample_before(tmp_path, caplog):
    """Cut inside s2's image (its first file): s0 and s1 whole, s2 skipped and named (the cut used to drop s1, whole,
    and name it); cut right after s1's last file, with no end-of-archive blocks: s0 and s1 read, the cut said and
    counted once by shard (it went unnoticed)."""
    samples = [{"__key__": f"s{i}", "jpg": GOOD, "txt": f"digit {i}"} for i in range(3)]
    write_shard(tmp_path / "full.tar", samples)
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "full.tar").unlink()
    header = data.index(b"s2.jpg")  # s2.jpg's header; its data starts 512 bytes on
    (tmp_path / "cut.tar").write_bytes(data[:header + 512 + len(GOOD) // 2])
    got, skipped = _read(tmp_path, caplog)
    assert got == [("s0", "digit 0"), ("s1", "digit 1")] and skipped == {"incomplete sample": 1}
    assert "'s2'" in caplog.text and "'s1'" not in caplog.text
    caplog.clear()
    (tmp_path / "cut.tar").write_bytes(data[:header])  # s1.txt's data ends here: a whole file, then nothing
    got, skipped = _read(tmp_path, caplog)
    assert got == [("s0", "digit 0"), ("s1", "digit 1")] and skipped == {"shard cut short": 1}
    assert "end-of-archive" in caplog.text and "cut.tar" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):  # a resume passing over it: nothing new to say
        reader = ShardReader(list_shards(str(tmp_path)), loop=True, shuffle_buffer=0)
        reader.restore({"epoch": 0, "next": 1, "key": "s0"})
        assert next(iter(reader)).key == "s1"
    assert "unreadable" not in caplog.text and not reader.skipped


def test_a_bad_pax_record_is_a_shard_error_not_a_crash_or_a_hang():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("é" * 120 + ".jpg")  # a pax `path` record
        info.size = len(GOOD)
        tar.addfile(info, io.BytesIO(GOOD))
    data = bytearray(buf.getvalue())
    at = data.index(b" path=")
    start = data.rindex(b"\n", 0, at) + 1 if b"\n" in data[512:at] else 512  # the record's length field
    for junk in (b"x" * (at - start), b"0" * (at - start)):  # not a number; 0 (would loop forever)
        bad = bytes(data[:start] + junk + data[at:])
        with pytest.raises(ShardError, match="pax record"):
            list(tar_files(bad))


def test_brace_patterns_as_webdataset_writes_them(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"train-{i:04d}.tar", [{"__key__": "k", "jpg": GOOD, "txt": "x"}])
    assert brace_expand("a{1..3}b") == ["a1b", "a2b", "a3b"]
    assert brace_expand("{08..10}") == ["08", "09", "10"] and brace_expand("{9..11}") == ["9", "10", "11"]
    assert brace_expand("{a,b{1..2}}-{x,y}") == ["a-x", "a-y", "b1-x", "b1-y", "b2-x", "b2-y"]
    names = lambda spec: [p.rsplit("/", 1)[1] for p in list_shards(spec)]  # noqa: E731
    assert names(f"{tmp_path}/train-{{0000..0002}}.tar") == ["train-0000.tar", "train-0001.tar", "train-0002.tar"]
    assert names(f"{tmp_path}/train-{{0002,0000}}.tar,{tmp_path}/train-0001.tar") == \
        ["train-0002.tar", "train-0000.tar", "train-0001.tar"]  # the comma inside braces is the pattern's
    with pytest.raises(FileNotFoundError, match=r"train-0003\.tar.*2 of its 4 names"):
        list_shards(f"{tmp_path}/train-{{0001..0004}}.tar")
    with pytest.raises(ValueError, match="unbalanced"):
        list_shards(f"{tmp_path}/train-{{0001..0004.tar")


def test_dataset_meta_found_however_the_shards_are_named(tmp_path):
    """A folder, a glob, a brace pattern or a list of the same shards: the same meta.json (it was found for a folder
    only, and the evaluation fell back to its default prompt for the others: 99.16 -> 97.21% on the demo)."""
    val = tmp_path / "val"
    val.mkdir()
    for i in range(2):
        write_shard(val / f"val-{i:04d}.tar", [{"__key__": "k", "jpg": GOOD, "txt": "x"}])
    meta = {"classnames": ["zero", "one"], "templates": ["a {}."]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))  # one level up, as clipfast.data.demo writes it
    for spec in (str(val), f"{val}/*.tar", f"{val}/val-{{0000..0001}}.tar", f"{val}/val-0000.tar,{val}/val-0001.tar"):
        assert dataset_meta(spec) == meta, spec
    (val / "meta.json").write_text(json.dumps({"templates": ["b {}."]}))  # beside the shards: that one first
    assert dataset_meta(f"{val}/*.tar") == {"templates": ["b {}."]}
    (val / "meta.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"meta\.json.*does not parse"):
        dataset_meta(str(val))
    assert dataset_meta(str(tmp_path / "no" / "where")) == {}


def test_evaluation_samples_need_no_txt_where_their_json_labels_or_captions_them(tmp_path, caplog):
    """The evaluation reads labels (zero-shot) and the .json's captions (retrieval): half the demo's validation
    samples without a .txt were skipped as 'no caption' (179 of 359 evaluated). Training still needs the .txt."""
    write_shard(tmp_path / "v.tar", [
        {"__key__": "a", "jpg": GOOD, "json": {"label": 3}},
        {"__key__": "b", "jpg": GOOD, "json": {"captions": ["one", "two"]}},
        {"__key__": "c", "jpg": GOOD, "txt": "with text", "json": {"label": 1}},
        {"__key__": "d", "jpg": GOOD, "json": {"source": "x"}},  # nothing to evaluate it by
        {"__key__": "e", "jpg": GOOD},
    ])
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):
        ev = ShardReader(list_shards(str(tmp_path)), loop=False, shuffle_buffer=0, need_caption=False)
        assert [(s.key, s.caption) for s in ev] == [("a", ""), ("b", ""), ("c", "with text")]
    assert ev.skipped == {"no caption": 2} and "'d'" in caplog.text and "'e'" in caplog.text
    got, skipped = _read(tmp_path, caplog)  # training's reader (need_caption=True)
    assert got == [("c", "with text")] and skipped == {"no caption": 4}

"""clipfast.data.make_shards: an ImageFolder tree, a CSV/TSV, COCO captions and Karpathy splits -> shards."""
import csv
import hashlib
import io
import json
import logging
import os
import shlex

import numpy as np
import pytest
from PIL import Image

from clipfast.data import ShardReader, list_shards
from clipfast.data.make_shards import from_image_folder, main

SIMPLE = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
          "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


def _img(path, w, h, mode="RGB", seed=0, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).convert(mode).save(path, **save)
    return path


def _read(out):
    reader = ShardReader(list_shards(str(out)), loop=False, shuffle_buffer=0)
    samples = list(reader)
    assert not reader.skipped  # what make_shards writes, the reader takes whole
    return samples


def _digest(out):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.glob("*.tar")))).hexdigest()


@pytest.fixture
def tree(tmp_path):
    """Three classes; "Bee" sorts before "ant_lion" (code points, as torchvision). Kinds of image by name; a stray file
    and a hidden folder at the top."""
    root = tmp_path / "tree"
    _img(root / "Bee" / "0.jpg", 24, 16, seed=1)
    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF orientation: shown turned 90 degrees
    _img(root / "Bee" / "cmyk.jpg", 40, 30, "CMYK", seed=2, exif=rotated.tobytes())
    _img(root / "Bee" / "1.bmp", 20, 36, seed=3)
    _img(root / "ant_lion" / "0.jpg", 16, 16, seed=4)
    _img(root / "ant_lion" / "1.png", 36, 20, seed=5)
    _img(root / "ant_lion" / "2.webp", 30, 30, seed=6)
    _img(root / "ant_lion" / "gray.jpg", 18, 40, "L", seed=7)
    _img(root / "zebra" / "0.jpg", 32, 24, seed=8)
    good = _img(root / "zebra" / "sub" / "deep.jpg", 20, 20, seed=9).read_bytes()
    (root / "zebra" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated
    png = bytearray(_img(tmp_path / "ok.png", 20, 20).read_bytes())
    png[png.find(b"IDAT") + 20] ^= 0xFF  # whole, so image_problem passes; its pixels do not inflate
    (root / "zebra" / "bad.png").write_bytes(png)
    (root / "notes.txt").write_text("not a class")
    _img(root / ".ipynb_checkpoints" / "x.jpg", 16, 16)  # not a class: would shift every label by one
    return root


def test_image_folder_labels_bytes_skips(tree, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):
        res = main(["--image-folder", str(tree), "--out", str(out), "--samples-per-shard", "4", "--no-progress"])
    samples = _read(out)
    sources = [s.meta["source"] for s in samples]
    assert sources == ["Bee/0.jpg", "Bee/1.bmp", "Bee/cmyk.jpg", "ant_lion/0.jpg", "ant_lion/1.png",
                       "ant_lion/2.webp", "ant_lion/gray.jpg", "zebra/0.jpg", "zebra/sub/deep.jpg"]
    assert [s.meta["label"] for s in samples] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert [s.key for s in samples] == sorted(s.key for s in samples) and samples[0].key == "val00000001"
    assert samples[3].caption == "a photo of a ant lion." and samples[3].meta["classname"] == "ant lion"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classnames"] == ["Bee", "ant lion", "zebra"] and meta["templates"] == SIMPLE
    assert meta["counts"] == {"val": 9} and meta["class_counts"] == [3, 4, 2]
    for s in samples:
        ext = s.meta["source"].rsplit(".", 1)[1]
        if ext in ("jpg", "png") and "cmyk" not in s.key + s.meta["source"]:  # stored byte for byte
            assert s.image == (tree / s.meta["source"]).read_bytes() and ext in s.parts
        else:  # BMP, WebP, CMYK: decoded, RGB, JPEG
            assert "jpg" in s.parts and s.image[:3] == b"\xff\xd8\xff"
            with Image.open(io.BytesIO(s.image)) as im, Image.open(tree / s.meta["source"]) as orig:
                upright = orig.size[::-1] if "cmyk" in s.meta["source"] else orig.size  # EXIF orientation applied
                assert im.mode == "RGB" and im.size == upright
    assert sorted(p.name for p in out.glob("*.tar")) == ["val-0000.tar", "val-0001.tar", "val-0002.tar"]
    summary = json.loads((out / "make_shards.json").read_text())
    assert summary == res
    assert (res["inputs"], res["written"], res["copied"], res["re_encoded"]) == (12, 9, 6, 3)
    assert res["skipped"] == {"image does not decode": 2, "not in a class folder": 1} and res["skipped_total"] == 3
    listed = {s["source"]: s for s in res["skipped_samples"]}
    assert listed["zebra/broken.jpg"]["key"] == "val00000010" and "truncated" in listed["zebra/broken.jpg"]["reason"]
    assert "notes.txt" in listed and "broken data stream" in listed["zebra/bad.png"]["reason"]
    assert "zebra/broken.jpg" in caplog.text and "val00000010" in caplog.text and "notes.txt" in caplog.text
    assert shlex.split(res["command"])[1:4] == ["-m", "clipfast.data.make_shards", "--image-folder"]
    assert res["shards"] == ["val-0000.tar", "val-0001.tar", "val-0002.tar"] and res["samples_per_shard"] == 4

    again = from_image_folder(tree, tmp_path / "again", samples_per_shard=4, workers=1, progress=False)
    assert _digest(tmp_path / "again") == _digest(out) and again["written"] == 9  # one thread or four: same bytes
    few = from_image_folder(tree, tmp_path / "few", limit=4, prefix="x", progress=False)
    assert few["inputs"] == 4 and [s.key for s in _read(tmp_path / "few")] == ["x00000001", "x00000002", "x00000003"]


def test_16_bit_and_float_grayscale_are_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit grayscale PNG's 0-65535 (PIL's convert clipped them to 0-255: nearly all white), a 0-1 float TIFF's;
    a float image outside 0-1 is skipped with its range named (its scale is not known)."""
    root = tmp_path / "deep" / "c"
    root.mkdir(parents=True)
    ramp = np.arange(32 * 32, dtype=np.float64).reshape(32, 32) / (32 * 32 - 1)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(root / "a16.png")
    Image.fromarray(ramp.astype(np.float32), "F").save(root / "b01.tif")
    Image.fromarray((ramp * 100).astype(np.float32), "F").save(root / "c100.tif")
    res = from_image_folder(tmp_path / "deep", tmp_path / "out", progress=False)
    samples = _read(tmp_path / "out")
    assert [s.meta["source"] for s in samples] == ["c/a16.png", "c/b01.tif"] and res["re_encoded"] == 2
    for s in samples:
        with Image.open(io.BytesIO(s.image)) as im:
            got = np.asarray(im.convert("L"), dtype=np.float64)
        assert np.abs(got - ramp * 255).mean() < 2 and (got == 255).mean() < 0.01
    [why] = [x["reason"] for x in res["skipped_samples"]]
    assert "F pixel values 0 to 100 are outside 0 to 1" in why


def test_max_side_shrinks_never_enlarges(tree, tmp_path):
    res = from_image_folder(tree, tmp_path / "out", max_side=24, quality=90, progress=False)
    samples = _read(tmp_path / "out")
    assert len(samples) == res["written"] == 9
    for s in samples:
        with Image.open(io.BytesIO(s.image)) as im, Image.open(tree / s.meta["source"]) as orig:
            w, h = orig.size[::-1] if "cmyk" in s.meta["source"] else orig.size  # shown upright (EXIF)
            if max(w, h) <= 24 and orig.format in ("JPEG", "PNG") and orig.mode in ("RGB", "L"):
                assert s.image == (tree / s.meta["source"]).read_bytes()  # nothing to change: kept
                continue
            assert im.format == "JPEG" and im.mode == "RGB"
            assert max(im.size) == min(24, max(w, h))  # shrunk to the bound, never enlarged
            assert abs(im.size[0] / im.size[1] - w / h) < 0.1  # aspect kept
    assert res["copied"] == 3 and res["re_encoded"] == 6  # Bee/0, ant_lion/0, deep.jpg are within 24 px


def test_classnames_and_templates(tree, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("honey bee\nantlion\n\nzebra\n")
    temps = tmp_path / "t.txt"
    temps.write_text("a {} here\nthere is a {}\n")
    from_image_folder(tree, tmp_path / "a", classnames=str(names), templates=str(temps), progress=False)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["classnames"] == ["honey bee", "antlion", "zebra"]
    assert meta["templates"] == ["a {} here", "there is a {}"]
    assert _read(tmp_path / "a")[0].caption == "a photo of a honey bee."
    from_image_folder(tree, tmp_path / "b", templates="openai", progress=False)
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert len(meta["templates"]) == 80 and meta["templates"][0] == "a bad photo of a {}."
    from_image_folder(tree, tmp_path / "c", templates="none", progress=False)
    assert "templates" not in json.loads((tmp_path / "c" / "meta.json").read_text())

    names.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="2 names for 3 class folders"):
        from_image_folder(tree, tmp_path / "d", classnames=str(names))
    temps.write_text("a {} here\nno slot\n")
    with pytest.raises(ValueError, match="template 2 .'no slot'. needs one {}"):
        from_image_folder(tree, tmp_path / "d", templates=str(temps))
    for argv, msg in [(["--classnames", "imagenet"], "1000 ImageNet class folders; found 3"),
                      (["--templates", "fancy"], "unknown --templates 'fancy'"),
                      (["--image-folder", str(tmp_path / "nope")], "nope': no such folder")]:
        with pytest.raises(SystemExit) as e:
            main(["--image-folder", str(tree), "--out", str(tmp_path / "d"), *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not list((tmp_path / "d").glob("*"))  # a bad argument writes nothing


def test_imagenet_classnames_follow_sorted_wnids(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    root = tmp_path / "in1k"
    wnids = [f"n{10_000_000 + 7 * i:08d}" for i in range(1000)]
    for w in wnids[::-1]:
        (root / w).mkdir(parents=True)
    _img(root / wnids[0] / "a.jpg", 16, 16)
    _img(root / wnids[999] / "b.jpg", 16, 16)
    from_image_folder(root, tmp_path / "out", classnames="imagenet", progress=False)
    samples = _read(tmp_path / "out")
    assert [(s.meta["label"], s.meta["classname"]) for s in samples] == [(0, "tench"), (999, "toilet paper")]
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["classnames"] == list(IMAGENET_CLASSNAMES)
    (root / wnids[5]).rename(root / "cats")
    with pytest.raises(ValueError, match="wnid folders .* found 'cats'"):
        from_image_folder(root, tmp_path / "bad", classnames="imagenet")


def test_refuses_to_overwrite_shards(tree, tmp_path, capsys):
    out = tmp_path / "out"
    main(["--image-folder", str(tree), "--out", str(out), "--samples-per-shard", "2", "--no-progress"])
    assert len(list(out.glob("*.tar"))) == 5
    before = _digest(out)
    with pytest.raises(SystemExit) as e:
        main(["--image-folder", str(tree), "--out", str(out), "--no-progress"])
    assert e.value.code == 2 and "already holds .tar shards (val-0000.tar" in capsys.readouterr().err
    assert _digest(out) == before
    main(["--image-folder", str(tree), "--out", str(out), "--no-progress", "--overwrite"])
    assert [p.name for p in out.glob("*.tar")] == ["val-0000.tar"] and len(_read(out)) == 9  # no stale shards


def test_a_prefix_names_not_utf8_and_a_left_temporary_shard_are_usage_errors_or_skips(tree, tmp_path, capsys):
    """A --prefix with a dot (every member then one key: nothing readable) or a slash; a class folder or a names file
    not in UTF-8 (the .json cannot hold it: a crash at the first shard's write) are usage errors naming them; an image
    whose file name is not UTF-8 is skipped, named with its bytes escaped; --overwrite removes a .tar.tmp left by an
    interrupted run."""
    for prefix in ("v1.0", "a/b"):
        with pytest.raises(SystemExit) as e:
            main(["--image-folder", str(tree), "--out", str(tmp_path / "p"), "--prefix", prefix, "--no-progress"])
        assert e.value.code == 2 and f"--prefix {prefix!r}: use letters, digits" in capsys.readouterr().err
    raw = bytes(tmp_path / "latin")
    _img(tmp_path / "latin" / "ok" / "a.jpg", 16, 16)
    os.makedirs(raw + b"/caf\xe9")
    Image.new("RGB", (16, 16)).save(os.fsdecode(raw + b"/caf\xe9/x.jpg"))
    with pytest.raises(SystemExit) as e:
        main(["--image-folder", str(tmp_path / "latin"), "--out", str(tmp_path / "l"), "--no-progress"])
    assert e.value.code == 2 and "class folder 'caf\\xe9' is not named in UTF-8" in capsys.readouterr().err
    os.rename(raw + b"/caf\xe9/x.jpg", raw + b"/ok/\xe9t\xe9.jpg")
    os.rmdir(raw + b"/caf\xe9")
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "val-0000.tar.tmp").write_bytes(b"half")
    res = main(["--image-folder", str(tmp_path / "latin"), "--out", str(tmp_path / "l"), "--no-progress",
                "--overwrite"])
    assert res["written"] == 1 and not (tmp_path / "l" / "val-0000.tar.tmp").exists()
    [skip] = res["skipped_samples"]
    assert skip["source"] == "ok/\\xe9t\\xe9.jpg" and "its path is not UTF-8" in skip["reason"]
    (tmp_path / "names.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SystemExit) as e:
        main(["--image-folder", str(tmp_path / "latin"), "--out", str(tmp_path / "n"), "--classnames",
              str(tmp_path / "names.txt"), "--no-progress"])
    assert e.value.code == 2 and "names.txt' is not UTF-8 text" in capsys.readouterr().err


def test_csv_relative_absolute_and_bad_rows(tmp_path, caplog, capsys):
    d = tmp_path / "pairs"
    _img(d / "img" / "a.jpg", 20, 20, seed=1)
    _img(d / "img" / "b.png", 20, 20, seed=2)
    absolute = _img(tmp_path / "elsewhere" / "c.jpg", 20, 20, seed=3)
    (d / "list.csv").write_text(
        "filepath,title,url\n"
        "img/a.jpg,a red thing,http://a\n"
        f"{absolute},\"quoted, with comma\",http://c\n"
        "img/missing.jpg,gone,http://m\n"
        "img/b.png,   ,http://b\n"
        "img/a.jpg,too few\n"
        "img/a.jpg,too,many,fields\n"
        ",no path,http://x\n"
        f"img/a.jpg,{'long' * 40_000},http://l\n"  # a field over csv.field_size_limit()
        "img/b.png,a blue thing,http://b\n")
    with open(d / "list.csv", "ab") as f:
        f.write(b"img/a.jpg,caf\xe9 in Latin-1,http://e\n")
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):
        res = main(["--csv", str(d / "list.csv"), "--out", str(tmp_path / "out"), "--keep-cols", "url",
                    "--no-progress"])
    samples = _read(tmp_path / "out")
    assert [s.caption for s in samples] == ["a red thing", "quoted, with comma", "a blue thing"]
    assert [s.meta for s in samples] == [{"source": "img/a.jpg", "url": "http://a"},
                                         {"source": str(absolute), "url": "http://c"},
                                         {"source": "img/b.png", "url": "http://b"}]
    assert samples[0].image == (d / "img" / "a.jpg").read_bytes() and samples[0].key == "train00000000"
    assert res["skipped"] == {"missing file": 1, "empty caption": 1, "bad CSV row": 5}
    reasons = {s["source"].split()[0]: s["reason"] for s in res["skipped_samples"]}
    assert reasons["list.csv:6"] == "bad CSV row (2 fields for 3 columns)"
    assert reasons["list.csv:7"] == "bad CSV row (4 fields for 3 columns)" and "field larger" in reasons["list.csv:9"]
    assert reasons["list.csv:11"] == "bad CSV row (not UTF-8)" and reasons["list.csv:4"] == "missing file"
    assert "list.csv:4 img/missing.jpg" in caplog.text and "list.csv:6" in caplog.text

    # an unbalanced quote in the last column: the rows after it go into its field, the field count still right
    (d / "quote.csv").write_text("filepath,title,url\nimg/a.jpg,one,http://a\nimg/b.png,two,\"http://b\n"
                                 "img/a.jpg,three,http://c\nimg/b.png,four,http://d\n")
    res = main(["--csv", str(d / "quote.csv"), "--out", str(tmp_path / "quote"), "--no-progress"])
    assert [s.caption for s in _read(tmp_path / "quote")] == ["one"] and res["skipped"] == {"bad CSV row": 3}
    assert [x["source"] for x in res["skipped_samples"]] == ["quote.csv:3", "quote.csv:4", "quote.csv:5"]  # each lost
    assert res["skipped_samples"][0]["reason"] == ("bad CSV row (lines 3-5 read as one row: a quote opened on line 3 "
                                                   "is not closed where it should be)")
    assert res["inputs"] == 4  # (rows as csv reads them: the three lines were one)
    # ... in a middle column of a TSV: the row ends with too many fields, where it was named by its last line alone
    (d / "quote.tsv").write_text("filepath\ttitle\nimg/a.jpg\tone\nimg/b.png\t\"two\nimg/a.jpg\tthree\n"
                                 "img/b.png\tfo\"ur\tx\nimg/a.jpg\tfive\n")
    res = main(["--csv", str(d / "quote.tsv"), "--sep", "\\t", "--out", str(tmp_path / "qt"), "--no-progress"])
    assert [s.caption for s in _read(tmp_path / "qt")] == ["one", "five"] and res["skipped"] == {"bad CSV row": 3}
    assert "lines 3-5 read as one row: a quote opened on line 3" in res["skipped_samples"][0]["reason"]
    # a caption with a line break, quoted as a CSV writer writes it, is a caption (it was skipped as a bad quote)
    with open(d / "multi.csv", "w", newline="") as f:
        csv.writer(f).writerows([["filepath", "title"], ["img/a.jpg", "a caption,\nover two lines"],
                                 ["img/b.png", "next"]])
    res = main(["--csv", str(d / "multi.csv"), "--out", str(tmp_path / "multi"), "--no-progress"])
    assert [s.caption for s in _read(tmp_path / "multi")] == ["a caption,\nover two lines", "next"]
    (d / "gone.csv").write_text("filepath,title\nimg/x.jpg,x\nimg/y.jpg,y\n")
    with pytest.raises(SystemExit, match=r"no samples written, all 2 skipped .*missing file.*relative to --root"):
        main(["--csv", str(d / "gone.csv"), "--out", str(tmp_path / "gone"), "--no-progress"])

    tsv = d / "list.tsv"
    tsv.write_text("url\tpath\tcaption\nhttp://a\ta.jpg\tred\n")
    res = main(["--csv", str(tsv), "--sep", "\\t", "--root", str(d / "img"), "--image-col", "path", "--caption-col",
                "caption", "--out", str(tmp_path / "tsv"), "--no-progress"])
    assert res["written"] == 1 and _read(tmp_path / "tsv")[0].meta == {"source": "a.jpg"}
    with pytest.raises(SystemExit) as e:
        main(["--csv", str(tsv), "--sep", "\t", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no column 'filepath' (--image-col); its columns: 'url', 'path', 'caption'" in err


def _coco(tmp_path):
    images = tmp_path / "val2017"
    for i in (1, 2, 3):
        _img(images / f"{i:012d}.jpg", 20, 16, seed=i)
    coco = {"images": [{"id": 3, "file_name": "000000000003.jpg"}, {"id": 1, "file_name": "000000000001.jpg"},
                       {"id": 2, "file_name": "000000000002.jpg"}],
            "annotations": [{"image_id": 1, "caption": "the first of one"}, {"image_id": 3, "caption": "three"},
                            {"image_id": 1, "caption": " a second of one "}, {"image_id": 9, "caption": "orphan"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    return images


def test_coco_captions_one_sample_per_image(tmp_path, capsys):
    images = _coco(tmp_path)
    res = main(["--coco-captions", str(tmp_path / "captions.json"), "--images", str(images), "--out",
                str(tmp_path / "out"), "--no-progress"])
    samples = _read(tmp_path / "out")
    assert [(s.key, s.caption) for s in samples] == [("retrieval00000000", "three"),
                                                     ("retrieval00000001", "the first of one")]
    assert samples[1].meta == {"captions": ["the first of one", "a second of one"], "image_id": 1,
                               "source": "000000000001.jpg"}
    assert res["skipped"] == {"no caption": 1} and res["skipped_samples"][0]["source"] == "000000000002.jpg"
    assert res["captions_without_image"] == 1
    (tmp_path / "k.json").write_text(json.dumps({"images": []}))
    with pytest.raises(SystemExit) as e:
        main(["--coco-captions", str(tmp_path / "k.json"), "--images", str(images), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "has no 'annotations' list" in capsys.readouterr().err


def test_karpathy_split_filter(tmp_path, capsys):
    images = _coco(tmp_path)
    (images / "sub").mkdir()
    (images / "000000000003.jpg").rename(images / "sub" / "000000000003.jpg")

    def img(i, split, sub=""):
        return {"filepath": sub, "filename": f"{i:012d}.jpg", "split": split, "imgid": i - 1, "cocoid": i,
                "sentences": [{"raw": f"cap {i}.{j}"} for j in range(5)]}

    split = {"images": [img(1, "test"), img(2, "train"), img(3, "test", "sub"), {**img(4, "restval")}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(split))
    base = ["--karpathy", str(tmp_path / "dataset_coco.json"), "--images", str(images), "--no-progress"]
    res = main([*base, "--out", str(tmp_path / "test")])
    samples = _read(tmp_path / "test")
    assert [s.meta["source"] for s in samples] == ["000000000001.jpg", "sub/000000000003.jpg"]
    assert samples[1].meta["captions"] == [f"cap 3.{j}" for j in range(5)] and samples[1].caption == "cap 3.0"
    assert samples[1].meta["image_id"] == 3 and res["images_in_file"] == {"test": 2, "train": 1, "restval": 1}
    res = main([*base, "--split", "train,restval", "--out", str(tmp_path / "tr")])
    assert res["inputs"] == 2 and res["written"] == 1 and res["skipped"] == {"missing file": 1}
    with pytest.raises(SystemExit) as e:
        main([*base, "--split", "val", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "restval (1 images), test (2 images), train (1 images)" in capsys.readouterr().err


def test_zero_shot_runs_on_image_folder_shards(tree, tmp_path):
    import torch

    from clipfast.evaluate import zero_shot
    from clipfast.model import CLIP
    from clipfast.presets import from_name

    res = from_image_folder(tree, tmp_path / "out", progress=False)
    torch.manual_seed(0)
    ev = zero_shot(CLIP(from_name("demo"), kernels="ref").eval(), str(tmp_path / "out"), batch_size=4)
    assert ev["samples"] == res["written"] == 9 and ev["classes"] == 3 and not ev["skipped"]

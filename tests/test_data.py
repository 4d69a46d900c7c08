import hashlib
import io
import logging
import tarfile

import numpy as np
import pytest
import torch

from clipfast.data import DaliLoader, ShardReader, list_shards, pack_text, write_shard
from clipfast.data.demo import build, digit_jpeg
from clipfast.reduce import TextReducer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    meta = build(out, seed=0, size=32)
    return out, meta


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.tar")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_demo_data_real_split_deterministic(demo, tmp_path):
    out, meta = demo
    assert meta["counts"]["train"] + meta["counts"]["val"] == 1797  # every scan, once
    assert 0.18 < meta["counts"]["val"] / 1797 < 0.22
    again = build(tmp_path / "again", seed=0, size=32)
    assert again == {**meta}
    assert _digest(out) == _digest(tmp_path / "again")
    other = build(tmp_path / "other", seed=1, size=32)
    assert _digest(tmp_path / "other") != _digest(out) and other["counts"] == meta["counts"]
    reader = ShardReader(list_shards(str(out / "val")), loop=False, shuffle_buffer=0)
    samples = list(reader)
    assert len(samples) == meta["counts"]["val"] and not reader.skipped
    names = meta["classnames"]
    for s in samples[:50]:
        label = s.meta["label"]
        assert s.meta["classname"] == names[label]
        assert names[label] in s.caption or str(label) in s.caption
    assert len({s.caption for s in samples}) > 30  # varied templates


def test_corrupt_samples_skipped_counted_logged(tmp_path, caplog):
    good = digit_jpeg(np.eye(8) * 16, 32)
    samples = [
        {"__key__": "ok1", "jpg": good, "txt": "a one"},
        {"__key__": "truncated", "jpg": good[: len(good) // 2], "txt": "cut"},
        {"__key__": "garbage", "jpg": b"\x00" * 500, "txt": "noise"},
        {"__key__": "nocap", "jpg": good},
        {"__key__": "emptycap", "jpg": good, "txt": "   "},
        {"__key__": "badjson", "jpg": good, "txt": "fine", "json": "{not json"},
        {"__key__": "ok2", "jpg": good, "txt": "another"},
    ]
    write_shard(tmp_path / "s.tar", samples)
    with tarfile.open(tmp_path / "s2.tar", "w") as tar:
        for name, data in [("badutf8.jpg", good), ("badutf8.txt", b"\xff\xfe\xfa")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar file at all" * 10)
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):
        reader = ShardReader(list_shards(str(tmp_path)), loop=False, shuffle_buffer=0)
        keys = [s.key for s in reader]
    assert keys == ["ok1", "ok2"]
    assert sum(reader.skipped.values()) == 7  # 5 bad samples in s.tar, 1 in s2.tar, 1 unreadable shard
    for key in ["truncated", "garbage", "nocap", "emptycap", "badjson", "badutf8"]:
        assert key in caplog.text
    assert "broken.tar" in caplog.text


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_shards(str(tmp_path / "nowhere"))


def test_pack_text():
    text, cu, max_len = pack_text([[1, 2, 3], [4], [5, 6]])
    assert text.dtype == torch.int32 and cu.dtype == torch.int32
    assert text.tolist() == [1, 2, 3, 4, 5, 6] and cu.tolist() == [0, 3, 4, 6] and max_len == 3


def test_dali_train_and_eval_batches(demo):
    out, meta = demo
    reducer = TextReducer("truncate", 8)
    dl = DaliLoader(str(out / "train"), 16, 24, reducer, train=True, crop_scale=(0.5, 1.0), threads=1)
    seen = set()
    for _ in range(3):
        b = next(dl)
        assert b["images"].shape == (16, 3, 24, 24) and b["images"].dtype == torch.uint8
        assert b["cu_seqlens"].shape == (17,) and b["cu_seqlens"][-1] == b["text"].shape[0]
        lengths = (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).tolist()
        assert max(lengths) == b["max_len"] <= 8
        tok = reducer.tok
        ends = (b["cu_seqlens"][1:] - 1).long()
        assert (b["text"][ends] == tok.eot_token_id).all()
        assert b["images"].float().std() > 10  # real pixels, not a blank
        seen.update(b["keys"])
    assert len(seen) == 48  # no repeats within the first epoch's batches
    ev = DaliLoader(str(out / "val"), 100, 24, reducer, train=False, threads=1)
    batches = list(ev)
    assert [len(b["keys"]) for b in batches] == [100, 100, 100, meta["counts"]["val"] - 300]
    keys = [k for b in batches for k in b["keys"]]
    assert keys == sorted(keys)  # evaluation reads in order, once


def test_sample_the_decoder_rejects_is_skipped_not_fatal(tmp_path, monkeypatch, caplog):
    """A sample that passes the reader's cheap checks but that DALI cannot decode: the loader finds it by a
    full host decode, skips and logs it, rebuilds the pipeline and carries on with every other sample."""
    import clipfast.data.shards as shards

    good = digit_jpeg(np.eye(8) * 16, 32)
    bad = good[:2] + b"\x00" * 300 + good[-2:]  # JPEG start and end markers around nothing decodable
    samples = [{"__key__": f"s{i}", "jpg": bad if i == 5 else good, "txt": f"caption {i}"} for i in range(12)]
    write_shard(tmp_path / "a.tar", samples)
    monkeypatch.setattr(shards, "image_problem", lambda data: None)  # let it through to the decoder
    dl = DaliLoader(str(tmp_path), 4, 16, TextReducer("truncate", 8), train=False, threads=1)
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):
        keys = [k for b in dl for k in b["keys"]]
    assert keys == [f"s{i}" for i in range(12) if i != 5]
    assert dl.skipped == {"does not decode": 1} and "'s5'" in caplog.text



def test_a_sample_only_dalis_decoder_rejects_is_found_by_dalis_decoder(tmp_path, monkeypatch, caplog):
    """Where PIL decodes every sample of the failed batches (libpng and libjpeg refuse some that it takes), each is
    tried alone through DALI's decoder: the one it refuses is skipped and named, the others kept (the error used to be
    raised, and stopped the run)."""
    import clipfast.data.loader as loader
    import clipfast.data.shards as shards

    good = digit_jpeg(np.eye(8) * 16, 32)
    bad = good[:2] + b"\x00" * 300 + good[-2:]
    samples = [{"__key__": f"s{i}", "jpg": bad if i in (2, 9) else good, "txt": f"caption {i}"} for i in range(12)]
    write_shard(tmp_path / "a.tar", samples)
    monkeypatch.setattr(shards, "image_problem", lambda data: None)
    monkeypatch.setattr(loader, "_host_rejects", lambda image: None)  # PIL takes them all
    dl = DaliLoader(str(tmp_path), 4, 16, TextReducer("truncate", 8), train=False, threads=1)
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):
        keys = [k for b in dl for k in b["keys"]]
    assert keys == [f"s{i}" for i in range(12) if i not in (2, 9)]
    assert dl.skipped == {"does not decode": 2} and "'s2'" in caplog.text and "'s9'" in caplog.text
    # DALI's decoder refusing every sample alone too (out of memory, say): the pipeline's error, not the samples'
    monkeypatch.setattr(loader.DaliLoader, "_dali_rejects", lambda self, image: "DALI: out of memory")
    dl = DaliLoader(str(tmp_path), 4, 16, TextReducer("truncate", 8), train=False, threads=1)
    with pytest.raises(RuntimeError, match="Critical error"):
        list(dl)
    assert dl.skipped == {}


def _tar_bytes(members, fmt):
    """A tar (tarfile's writer) of (name, bytes or None for a directory) in `fmt`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _stdlib_files(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_files_reads_what_tarfile_reads(fmt):
    """clipfast's tar reader against tarfile's over names of every length (ustar's prefix field, GNU's long-name
    members, pax records), non-ASCII names, empty files, sizes around the 512-byte blocks and directories."""
    from clipfast.data.shards import ShardError, tar_files

    rng = np.random.default_rng(0)
    long_dir = "d" * 120  # > 100 characters: a prefix (ustar) / an `L` member (GNU) / a pax `path` record
    members = [("top", None), ("a.jpg", rng.bytes(511)), ("a.txt", b"x"), ("sub/b.jpg", rng.bytes(512)),
               ("sub/b.txt", b""), (f"{long_dir}/c.jpg", rng.bytes(513)), (f"{long_dir}/c.txt", "café ☕".encode())]
    if fmt != tarfile.USTAR_FORMAT:  # (ustar takes ASCII names of at most 100 characters after the prefix)
        members += [("é" * 30 + ".json", b"{}"), ("e" * 150 + ".jpg", rng.bytes(2000))]
    data = _tar_bytes(members, fmt)
    want = _stdlib_files(data)
    assert len(want) == len(members) - 1
    assert list(tar_files(data)) == want
    cut = data[: len(data) // 2]  # ends inside a file: the files before it, then the error naming the file
    got = []
    with pytest.raises(ShardError, match="needs|header"):
        for f in tar_files(cut):
            got.append(f)
    assert got == [f for f in want if f in got] and 0 < len(got) < len(want)
    bad = bytearray(data)
    bad[512 + 3] ^= 0x01  # a bit flipped in the second header (a.jpg's name; the directory has no data block)
    with pytest.raises(ShardError, match="checksum"):
        list(tar_files(bytes(bad)))
    for junk, why in ((b"", "empty"), (b"not a tar" * 100, "not a tar file"), (b"x" * 100, "inside a header")):
        with pytest.raises(ShardError, match=why):
            list(tar_files(junk))


def test_eval_images_are_open_clips_eval_transform(tmp_path):
    """The evaluation pipeline's images against open_clip's evaluation transform (bicubic Resize(size) + CenterCrop on
    PIL images) on the same files: landscape, portrait, square, smaller and larger than the size, odd offsets to
    centre (rounded half to even there), grayscale, PNG, a JPEG whose EXIF says to rotate (neither applies it)."""
    import open_clip.transform
    from PIL import Image

    rng = np.random.default_rng(3)
    exif = Image.Exif()
    exif[0x0112] = 6
    sizes = [(291, 270), (509, 180), (268, 303), (64, 64), (40, 97), (95, 31), (33, 33), (300, 301), (150, 77)]
    samples = []
    for i, (w, h) in enumerate(sizes):
        small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)  # smooth content: noise upsampled
        im = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        if i == 4:
            im.save(buf, format="PNG")
        else:
            kw = {"exif": exif} if i == 6 else {}
            (im.convert("L") if i == 5 else im).save(buf, format="JPEG", quality=95, **kw)
        samples.append({"__key__": f"s{i:02d}", "png" if i == 4 else "jpg": buf.getvalue(), "txt": "a caption"})
    write_shard(tmp_path / "eval-0000.tar", samples)
    for size in (32, 48):
        batch = next(iter(DaliLoader(str(tmp_path), len(sizes), size, TextReducer("truncate", 8), train=False,
                                     threads=1)))
        tf = open_clip.transform.image_transform(size, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))
        ref = torch.stack([tf(Image.open(io.BytesIO(s.get("jpg", s.get("png"))))) for s in samples]) * 255
        diff = (batch["images"].float() - ref.round()).abs()
        per_image = diff.mean(dim=(1, 2, 3))
        assert per_image.max() < 1.0 and diff.mean() < 0.5, (size, per_image.tolist())


def test_jpeg_and_png_sizes_from_their_headers_as_pil_reads_them():
    """image_problem reads JPEG frame headers itself (PIL's Image.open took ~50 us a sample): the same sizes as PIL
    for baseline, progressive, grayscale, CMYK and EXIF-carrying JPEGs and PNGs; a header without a frame is a
    problem named as such."""
    from PIL import Image

    from clipfast.data.shards import image_problem, jpeg_size

    rng = np.random.default_rng(1)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: an APP1 segment before the frame header
    cases = [("RGB", (37, 23), {}), ("RGB", (64, 48), {"progressive": True}), ("L", (17, 90), {}),
             ("CMYK", (40, 40), {}), ("RGB", (300, 7), {"exif": exif.tobytes(), "quality": 30}),
             ("RGB", (33, 65), {"restart_marker_blocks": 1, "optimize": True})]
    for mode, size, kw in cases:
        pixels = rng.integers(0, 255, (size[1], size[0], 1 if mode == "L" else 3), dtype=np.uint8)
        im = Image.fromarray(pixels.squeeze(2) if mode == "L" else pixels)
        buf = io.BytesIO()
        (im.convert("CMYK") if mode == "CMYK" else im).save(buf, format="JPEG", **kw)
        data = buf.getvalue()
        assert jpeg_size(data) == Image.open(io.BytesIO(data)).size == size, (mode, kw)
        assert image_problem(data) is None
        png = io.BytesIO()
        im.save(png, format="PNG")
        assert image_problem(png.getvalue()) is None
    padded = data[:2] + b"\xff\xfe\x00\x05abc" + b"\xff" + data[2:]  # a comment segment, then a fill byte
    assert jpeg_size(padded) == Image.open(io.BytesIO(padded)).size == size
    sof = data.find(b"\xff\xc0") if data.find(b"\xff\xc0") > 0 else data.find(b"\xff\xc1")
    no_frame = data[:sof] + data[data.find(b"\xff\xda"):]  # the frame header cut out: the scan comes first
    assert "no frame header before the scan" in image_problem(no_frame)
    assert "unreadable JPEG header (segment of length 0" in image_problem(data[:3] + b"\x00" * 40 + data[-40:])
    zero = bytearray(data)
    zero[sof + 5: sof + 9] = b"\x00\x00\x00\x00"  # a frame of 0x0 pixels
    assert image_problem(bytes(zero)) == "JPEG of size 0x0"


def _data_path_bench():
    """bench/data_path.py as a module (bench/ is scripts, not a package import here)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("data_path", Path(__file__).parents[1] / "bench" / "data_path.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_data_path_bench_writes_its_tables(tmp_path):
    """bench/data_path.py on a few samples: every stage timed, the tables and JSON written."""
    import json

    mod = _data_path_bench()
    res = mod.main(["--samples", "60", "--per-shard", "30", "--work", str(tmp_path / "shards"), "--out",
                    str(tmp_path / "out"), "--no-loader"])
    assert res["meta"]["samples"] == 60 and len(res["us_per_sample"]) == 6
    assert all(v > 0 for v in res["us_per_sample"].values())
    assert json.loads((tmp_path / "out" / "data_path.json").read_text())["host_us_per_sample"] == \
        res["host_us_per_sample"]
    assert res["reader_process_us_per_sample"] > 0 and set(res["reader_processes_us_per_sample"]) == {1, 2}
    md = (tmp_path / "out" / "data_path.md").read_text()
    assert "| read (tar + checks) |" in md and "| reader process: read + truncate to 16" in md
    assert "| resume: passing over (read + checks + shuffle, not yielded) |" in md
    assert "| reader processes: the same in 2 children" in md


def test_data_path_bench_without_lemminflect_leaves_out_the_syntax_row(tmp_path, monkeypatch, capsys):
    """The GPU machines' image has no lemminflect (clipfast.pos's lexicon): the bench times the other stages and says
    why the syntax-masking row is missing, instead of failing at its first caption (the H100 suite at 5de47bf)."""
    import sys

    mod = _data_path_bench()
    monkeypatch.setitem(sys.modules, "lemminflect", None)  # import fails, find_spec finds nothing
    res = mod.main(["--samples", "40", "--per-shard", "20", "--work", str(tmp_path / "shards"), "--out",
                    str(tmp_path / "out"), "--no-loader", "--reader-processes"])
    assert set(res["host_us_per_sample"]) == {"truncate to 77", "truncate to 16"}
    assert not any("syntax" in k for k in res["us_per_sample"]) and len(res["us_per_sample"]) == 5
    assert "lemminflect is not installed" in capsys.readouterr().err


def test_data_path_bench_refuses_too_few_samples_for_its_loader_rows(tmp_path, capsys):
    """The loader is timed over batches of 256: fewer samples were a ZeroDivisionError after the other stages' work."""
    mod = _data_path_bench()
    with pytest.raises(SystemExit) as e:
        mod.main(["--samples", "200", "--work", str(tmp_path / "shards"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "batches of 256 (or --no-loader)" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()

"""clipfast.data.filter (score pairs with a CLIP model, keep the best) and the demo's noisy variant."""
import json
import tarfile

import numpy as np
import pytest
import torch

import clipfast.data.shards as shards
from clipfast.data import ShardReader, list_shards, write_shard
from clipfast.data.demo import CLASSNAMES, build, digit_jpeg
from clipfast.data.filter import decode, main, select


def _raw(folder):
    """{key: {ext: bytes}} of every .tar in folder, as stored."""
    out = {}
    for p in sorted(folder.glob("*.tar")):
        with tarfile.open(p) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory):
    from clipfast.checkpoint import save_model
    from clipfast.config import TrainConfig
    from clipfast.model import CLIP
    from clipfast.presets import from_name

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("scorer") / "model.pt"
    save_model(path, CLIP(from_name("demo"), kernels="ref"), TrainConfig(), step=0)
    return path


@pytest.fixture
def shards_in(tmp_path, monkeypatch):
    """14 digit pairs in two shards, plus a truncated JPEG (the reader skips it) and one only the decoder rejects."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    good = [{"__key__": f"k{i:02d}", "jpg": digit_jpeg(digits.images[i], 32), "txt": f"the digit {digits.target[i]}",
             "json": {"label": int(digits.target[i]), "i": i}} for i in range(14)]
    truncated = {"__key__": "cut", "jpg": good[0]["jpg"][:200], "txt": "the digit 0"}
    bad = good[1]["jpg"][:2] + b"\x00" * 300 + good[1]["jpg"][-2:]
    undecodable = {"__key__": "nodecode", "jpg": bad, "txt": "the digit 1"}
    real = shards.image_problem
    monkeypatch.setattr(shards, "image_problem", lambda data: None if data == bad else real(data))
    folder = tmp_path / "in"
    folder.mkdir()
    write_shard(folder / "a-0000.tar", good[:5] + [truncated] + good[5:8])
    write_shard(folder / "a-0001.tar", good[8:11] + [undecodable] + good[11:])
    return folder


def test_select_keeps_top_fraction_ties_by_order():
    scores = [0.1, 0.5, 0.3, 0.5, 0.5, -0.2, 0.3]
    kept, thr = select(scores, keep_fraction=0.4)  # round(2.8) = 3: the three 0.5s
    assert kept == [False, True, False, True, True, False, False] and thr == 0.5
    kept, thr = select(scores, keep_fraction=0.3)  # round(2.1) = 2: the two earliest 0.5s
    assert kept == [False, True, False, True, False, False, False] and thr == 0.5
    kept, thr = select(scores, keep_fraction=0.5)  # 3.5 rounds half up to 4: then the earlier 0.3
    assert kept == [False, True, True, True, True, False, False] and thr == 0.3
    assert select(scores, keep_fraction=1.0) == ([True] * 7, -0.2)
    assert select(scores, min_score=0.3) == ([False, True, True, True, True, False, True], 0.3)
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 101).tolist()  # many ties
    for f in (0.01, 0.25, 0.5, 0.99):
        kept, thr = select(s, keep_fraction=f)
        k = int(np.floor(f * 101 + 0.5))
        assert sum(kept) == k
        want = sorted(range(101), key=lambda i: (-s[i], i))[:k]
        assert [i for i in range(101) if kept[i]] == sorted(want) and thr == s[want[-1]]
    with pytest.raises(ValueError, match="exactly one"):
        select(s, 0.5, 0.1)
    with pytest.raises(ValueError, match="keep_fraction"):
        select(s, keep_fraction=0.0)


def _scores_one_by_one(model_pt, folder):
    """Each valid sample's cosine similarity computed alone (batch of one), by key."""
    from clipfast.evaluate import load_model
    from clipfast.reduce import TextReducer

    model = load_model(str(model_pt))
    red = TextReducer("truncate", model.context_length)
    out = {}
    with torch.no_grad():
        for s in ShardReader(list_shards(str(folder)), loop=False, shuffle_buffer=0):
            try:
                img = torch.from_numpy(decode(s.image, model.cfg.vision.image_size))[None]
            except Exception:
                continue
            ids = torch.tensor(red(s.caption), dtype=torch.int32)
            t = model.encode_text_packed(ids, torch.tensor([0, len(ids)], dtype=torch.int32), len(ids), normalize=True)
            out[s.key] = (model.encode_image(img, normalize=True) * t).sum().item()
    return out


def test_filter_keeps_top_half_writes_same_bytes_skips_corrupt(model_pt, shards_in, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="clipfast.data"):
        res = main(["--checkpoint", str(model_pt), "--data", str(shards_in), "--out", str(out), "--keep-fraction",
                    "0.5", "--samples-per-shard", "3", "--batch-size", "4", "--device", "cpu", "--no-progress"])
    logged = caplog.text
    assert logged.count("'cut'") == 1 and logged.count("'nodecode'") == 1  # logged by key, once (not again on copy)
    assert res["skipped"] == {"JPEG without its end marker": 1, "does not decode": 1}
    assert {(x["key"], x["shard"]) for x in res["skipped_samples"]} == {("cut", "a-0000.tar"),
                                                                         ("nodecode", "a-0001.tar")}
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"k{i:02d}" for i in range(14)]  # read order, corrupt ones absent
    alone = _scores_one_by_one(model_pt, shards_in)
    for r in rows:  # batched scores are each pair's own (image i with caption i)
        assert r["score"] == pytest.approx(alone[r["key"]], abs=1e-5)
    best = sorted(range(14), key=lambda i: (-rows[i]["score"], i))[:7]
    assert [r["kept"] for r in rows] == [i in best for i in range(14)]
    assert res["kept"] == 7 and res["scored"] == 14 and res["threshold"] == rows[best[-1]]["score"]

    assert res["shards_out"] == ["filtered-0000.tar", "filtered-0001.tar", "filtered-0002.tar"]
    back = list(ShardReader(list_shards(str(out)), loop=False, shuffle_buffer=0))
    kept_keys = [r["key"] for r in rows if r["kept"]]
    assert [s.key for s in back] == kept_keys  # in read order
    with tarfile.open(out / "filtered-0002.tar") as tar:
        assert len(tar.getnames()) == 3  # 7 = 3 + 3 + 1 samples, three files each
    src, dst = _raw(shards_in), _raw(out)
    assert dst == {k: src[k] for k in kept_keys}  # every file, byte for byte
    summary = json.loads((out / "filter.json").read_text())
    assert summary["kept"] == 7 and summary["skipped_total"] == 2 and "--keep-fraction 0.5" in summary["command"]
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out2 = tmp_path / "again"  # deterministic: the same run gives the same files
    main(["--checkpoint", str(model_pt), "--data", str(shards_in), "--out", str(out2), "--keep-fraction", "0.5",
          "--samples-per-shard", "3", "--batch-size", "4", "--device", "cpu", "--no-progress"])
    for name in res["shards_out"]:
        assert (out2 / name).read_bytes() == (out / name).read_bytes()

    out3 = tmp_path / "min"
    thr = sorted(r["score"] for r in rows)[9]
    res3 = main(["--checkpoint", str(model_pt), "--data", str(shards_in), "--out", str(out3), "--min-score",
                 repr(thr), "--batch-size", "4", "--device", "cpu", "--no-progress"])
    assert res3["kept"] == sum(r["score"] >= thr for r in rows) and res3["shards_out"] == ["filtered-0000.tar"]


def test_open_clip_weights_score_as_the_same_clipfast_model(model_pt, shards_in, tmp_path, monkeypatch):
    import clipfast.interop as interop
    from clipfast.presets import from_name

    def demo_config(name, **kw):  # stands in for an open_clip name: no download, a tiny model
        assert name == "tiny-test-model"
        return from_name("demo")

    monkeypatch.setattr(interop, "config_from_open_clip", demo_config)
    ckpt = torch.load(model_pt, weights_only=False)
    torch.save(interop.to_open_clip(ckpt["state_dict"]), tmp_path / "open_clip.pt")
    common = ["--data", str(shards_in), "--keep-fraction", "0.5", "--device", "cpu", "--no-progress"]
    main(["--checkpoint", str(model_pt), "--out", str(tmp_path / "a"), *common])
    main(["--checkpoint", str(tmp_path / "open_clip.pt"), "--open-clip", "tiny-test-model", "--out",
          str(tmp_path / "b"), *common])
    a, b = ((tmp_path / d / "scores.jsonl").read_text() for d in "ab")
    assert a == b


@pytest.mark.parametrize("change, message", [
    ({}, "one of the arguments --keep-fraction --min-score is required"),
    ({"--keep-fraction": "0.5", "--min-score": "0.2"}, "not allowed with argument"),
    ({"--keep-fraction": "0"}, "--keep-fraction must be in (0, 1], got 0.0"),
    ({"--keep-fraction": "1.5"}, "--keep-fraction must be in (0, 1], got 1.5"),
    ({"--min-score": "2"}, "--min-score is a cosine similarity, in [-1, 1]; got 2.0"),
    ({"--keep-fraction": "0.5", "--samples-per-shard": "0"}, "--samples-per-shard must be at least 1, got 0"),
    ({"--keep-fraction": "0.5", "--checkpoint": "MISSING/model.pt"}, "--checkpoint 'MISSING/model.pt': no such file"),
    ({"--keep-fraction": "0.5", "--data": "NOWHERE"}, "--data: no .tar shards found at 'NOWHERE'"),
    ({"--keep-fraction": "0.5", "--out": "IN"}, "--out 'IN' already holds .tar shards"),
])
def test_bad_arguments_are_clear_errors(model_pt, shards_in, capsys, change, message):
    args = {"--checkpoint": str(model_pt), "--data": str(shards_in), "--out": str(shards_in.parent / "o")}
    args.update({k: v.replace("IN", str(shards_in)) for k, v in change.items()})
    with pytest.raises(SystemExit) as e:
        main([x for kv in args.items() for x in kv])
    assert e.value.code == 2
    assert message.replace("IN", str(shards_in)) in capsys.readouterr().err


def test_demo_noise_flips_exactly_that_share_of_train_captions(data, tmp_path):
    meta = build(tmp_path, seed=0, size=32, noise=0.5)
    assert meta["noise"] == {"share": 0.5, "noisy_train_captions": 719}  # round(0.5 * 1438)
    assert _raw(tmp_path / "val") == _raw(data / "val")  # val untouched
    clean, noisy = _raw(data / "train"), _raw(tmp_path / "train")
    assert clean.keys() == noisy.keys()
    flipped = 0
    for key, parts in noisy.items():
        info = json.loads(parts["json"])
        assert parts["jpg"] == clean[key]["jpg"] and info["label"] == json.loads(clean[key]["json"])["label"]
        said = info["caption_label"]
        assert (said != info["label"]) == info["noisy"]
        assert CLASSNAMES[said] in parts["txt"].decode() or str(said) in parts["txt"].decode()
        if not info["noisy"]:
            assert parts["txt"] == clean[key]["txt"]  # the same template draw as the clean build
        flipped += info["noisy"]
    assert flipped == 719
    with pytest.raises(ValueError, match="noise"):
        build(tmp_path / "x", noise=1.5)


def test_decode_turns_an_image_upright_by_its_exif_orientation():
    """A 2:1 image stored on its side with EXIF orientation 6 (rotate 90 degrees clockwise to view): decoded upright,
    as DALI decodes it for training, so its top half (white) is the top of the centre crop."""
    import io

    import numpy as np
    from PIL import Image

    from clipfast.data.filter import decode

    upright = Image.new("RGB", (32, 64), (0, 0, 0))
    upright.paste((255, 255, 255), (0, 0, 32, 32))  # white on top
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # on its side: viewing needs 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    out = decode(buf.getvalue(), 16).astype(np.int32)  # (3, 16, 16): short side 16 -> 16 x 32, centre crop rows 8-24
    assert out[:, :6].mean() > 200 and out[:, -6:].mean() < 60


def test_decode_gives_open_clips_evaluation_pixels():
    """Without an orientation tag, decode is open_clip's evaluation transform to the pixel (both PIL's bicubic):
    landscape, portrait, square, smaller and larger than the size, offsets that round half to even."""
    import io

    import numpy as np
    import open_clip.transform
    import torch
    from PIL import Image

    from clipfast.data.filter import decode

    rng = np.random.default_rng(4)
    for w, h in [(291, 270), (509, 180), (268, 303), (40, 97), (33, 33), (300, 301), (150, 77), (17, 29)]:
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        for size in (32, 48):
            ref = open_clip.transform.image_transform(size, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))(im)
            assert torch.equal(torch.from_numpy(decode(buf.getvalue(), size)), (ref * 255).round().to(torch.uint8)), \
                (w, h, size)


def test_a_runs_checkpoints_score_as_its_model_file_and_latest_names_one(model_pt, shards_in, tmp_path, capsys):
    """filter takes what evaluate and export take: a run's checkpoint <run>/ckpt/step<N> (it refused one), and
    <run>/ckpt/latest reads as the checkpoint it names (torch.load raised 'unpickling stack underflow' on the pointer
    file); a file torch cannot read is a ValueError naming it."""
    import shutil

    from clipfast.checkpoint import is_model_path, read_model_file

    run = tmp_path / "run"
    (run / "ckpt" / "step3").mkdir(parents=True)
    shutil.copy(model_pt, run / "model.pt")
    sd = torch.load(model_pt, weights_only=False)["state_dict"]
    torch.save({"module": {k: v * 2 if v.is_floating_point() else v for k, v in sd.items()}},
               run / "ckpt" / "step3" / "state.pt")
    (run / "ckpt" / "latest").write_text("step3")
    for path in ("ckpt/step3", "ckpt/latest"):
        got = read_model_file(str(run / path))
        assert got["step"] == 3 and torch.equal(got["state_dict"]["logit_scale"], 2 * sd["logit_scale"].float())
        assert is_model_path(str(run / path))
    assert not is_model_path(str(run / "ckpt")) and not is_model_path(str(run / "ckpt" / "step9"))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pt is not a model file torch can read"):
        read_model_file(str(tmp_path / "notes.pt"))
    main(["--checkpoint", str(run / "ckpt" / "step3"), "--data", str(shards_in), "--keep-fraction", "0.5",
          "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o")])
    assert len((tmp_path / "o" / "scores.jsonl").read_text().splitlines()) > 0

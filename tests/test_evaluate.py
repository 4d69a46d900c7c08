"""clipfast.evaluate: retrieval's recall@K (against a brute-force count, ties, chunks), retrieval over shards with
several captions per image, the named prompt sets, and the trainer's evaluations every eval_every steps."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfast.evaluate import named_classnames, named_templates, recall_at_k, retrieval, scalars, summary

ROOT = Path(__file__).resolve().parents[1]


def _recall_brute(img, txt, owner, k):
    """Plain loops over sorted scores (no ties in random data)."""
    i2t, t2i = [], []
    for n in range(img.shape[0]):
        order = sorted(range(txt.shape[0]), key=lambda m: -float(img[n] @ txt[m]))
        i2t.append(any(owner[m] == n for m in order[:k]))
    for m in range(txt.shape[0]):
        order = sorted(range(img.shape[0]), key=lambda n: -float(img[n] @ txt[m]))
        t2i.append(owner[m] in order[:k])
    return np.mean(i2t), np.mean(t2i)


@pytest.mark.parametrize("chunk", [3, 1024])
def test_recall_at_k_counts_as_plain_sorting_does(chunk):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(13, 8, generator=g), dim=-1)
    owner = torch.tensor([n for n in range(13) for _ in range(1 + n % 3)])  # 1-3 captions per image
    txt = F.normalize(img[owner] + 0.9 * torch.randn(len(owner), 8, generator=g), dim=-1)
    res = recall_at_k(img, txt, owner, ks=(1, 2, 5), chunk=chunk)
    for k in (1, 2, 5):
        i2t, t2i = _recall_brute(img, txt, owner.tolist(), k)
        assert res[f"i2t_r{k}"] == pytest.approx(i2t) and res[f"t2i_r{k}"] == pytest.approx(t2i)
    assert 0 < res["t2i_r1"] < res["t2i_r5"] < 1  # the noise makes it a real ranking, not all hits or misses


def test_ties_are_broken_at_random_in_expectation():
    e = torch.eye(3)
    img = e  # three images, each the axis of its own
    # captions 0 and 1 read the same (both on axis 0) but belong to images 0 and 1; caption 2 is image 2's
    txt = torch.stack([e[0], e[0], e[2]])
    res = recall_at_k(img, txt, torch.tensor([0, 1, 2]), ks=(1, 2))
    # image 0: its caption ties with caption 1 (a hit at 1 half the time); image 1: all three captions score 0 for
    # it, its own among two others (1/3 at 1, 2/3 at 2); image 2: alone at the top
    assert res["i2t_r1"] == pytest.approx((0.5 + 1 / 3 + 1) / 3)
    assert res["i2t_r2"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    # caption 0: image 0 alone at the top; caption 1: image 0 ahead of its image 1, which ties with image 2
    assert res["t2i_r1"] == pytest.approx((1 + 0 + 1) / 3)
    assert res["t2i_r2"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_ties_among_an_images_own_captions_count_as_every_tie_break_order_does():
    """An image whose own captions tie with others (identical captions, several per image): recall@K is the mean hit
    over every order the tied captions could be ranked in, enumerated here (7! orders). Counting only the other
    images' tied captions gave i2t R@1 0.42 instead of 0.5 on two images with three identical captions."""
    import itertools

    img = torch.eye(3)
    txt = torch.stack([torch.tensor([0.8, 0.6, 0.0])] * 4 + [torch.tensor([0.0, 0.8, 0.6])] * 2
                      + [torch.tensor([0.6, 0.0, 0.8])])  # 7 captions in three groups that read the same
    owner = torch.tensor([0, 0, 1, 2, 1, 1, 0])  # image 0: two own among four tied at its best; image 2: at 0
    scores = (img @ txt.T).tolist()
    for k in (1, 2, 3, 5):
        hits = [0.0, 0.0, 0.0]
        perms = list(itertools.permutations(range(7)))
        for tie_break in perms:  # rank by score, ties in this order
            for i in range(3):
                order = sorted(range(7), key=lambda c: (-scores[i][c], tie_break[c]))
                hits[i] += any(owner[c] == i for c in order[:k])
        want = sum(h / len(perms) for h in hits) / 3
        assert recall_at_k(img, txt, owner, ks=(k,))[f"i2t_r{k}"] == pytest.approx(want, abs=1e-6), k


def _solid_jpeg(level: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (level, level, level)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


class _Oracle(torch.nn.Module):
    """Stands in for CLIP: an image's embedding is the axis of its grey level's index, a caption's the axis that
    `answer` gives it; with every answer right, retrieval is perfect."""

    def __init__(self, levels, answer: dict):
        super().__init__()
        from clipfast.presets import from_name
        from clipfast.reduce import TextReducer

        self.cfg = from_name("demo")
        self.cfg.vision.image_size = 16
        self.context_length = self.cfg.text.context_length
        self.levels, reducer = torch.tensor(levels, dtype=torch.float32), TextReducer("truncate", self.context_length)
        self.answer = {tuple(reducer(c)): n for c, n in answer.items()}
        self.dim = len(levels)

    def encode_image(self, images, keep=None, normalize=False):
        mean = images.float().mean(dim=(1, 2, 3))  # (B,)
        return F.one_hot((mean[:, None] - self.levels).abs().argmin(1), self.dim).float()

    def encode_text_packed(self, ids, cu, max_len, normalize=False):
        seqs = [tuple(ids[a:b].tolist()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return F.one_hot(torch.tensor([self.answer[s] for s in seqs]), self.dim).float()


def test_retrieval_over_shards_with_several_captions_per_image(tmp_path):
    from clipfast.data import write_shard

    levels = [20, 60, 100, 140, 180, 220]
    caps = {0: ["a dark square"], 1: ["a grey square", "grey again", "a third one"], 2: ["mid grey"],
            3: ["light grey"], 4: ["lighter still", "pale"], 5: ["almost white"]}
    samples = [{"__key__": f"s{n}", "jpg": _solid_jpeg(lv), "txt": caps[n][0],
                **({"json": {"captions": caps[n]}} if len(caps[n]) > 1 else {})} for n, lv in enumerate(levels)]
    write_shard(tmp_path / "r-0000.tar", samples[:4])
    write_shard(tmp_path / "r-0001.tar", samples[4:])
    answer = {c: n for n, cs in caps.items() for c in cs}
    res = retrieval(_Oracle(levels, answer), str(tmp_path), batch_size=4, threads=1)
    assert res["images"] == 6 and res["captions"] == 9
    assert all(res[f"{d}_r{k}"] == 1 for d in ("i2t", "t2i") for k in (1, 5, 10)) and res["mean_recall"] == 1
    # one of image 1's three captions answered with image 4: that caption misses at 1 (image 4 alone at the top); image
    # 1 still finds its other two, and for image 4 the stray caption ties with its own two (a hit at 1 two times in
    # three: two of the three tied captions are its own; counted as one in three tied, 1/2, before 77bb832)
    res = retrieval(_Oracle(levels, {**answer, "grey again": 4}), str(tmp_path), batch_size=4, threads=1)
    assert res["t2i_r1"] == pytest.approx(8 / 9) and res["i2t_r1"] == pytest.approx((5 + 2 / 3) / 6)
    assert res["t2i_r5"] == pytest.approx((8 + 4 / 5) / 9) and res["i2t_r5"] == 1  # (1 ahead, 4 tied for 4 places)
    assert "t2i R@1 88.89%" in summary("retrieval", "x", res) and scalars({"retrieval": res})["retrieval/images"] == 6

    write_shard(tmp_path / "r-0001.tar", [{**samples[4], "json": {"captions": []}}])
    with pytest.raises(ValueError, match="'s4'.*non-empty list"):
        retrieval(_Oracle(levels, answer), str(tmp_path), batch_size=4, threads=1)


def test_zero_shot_class_names_from_the_samples_with_a_label_no_sample_has(tmp_path):
    """No meta.json: the class names come from the samples' 'classname'; label 2 has no sample (so no name). The
    named labels are the classes (their samples renumbered to match), where the gap was an error about label 3."""
    from clipfast.data import write_shard
    from clipfast.evaluate import zero_shot

    levels, labels, names = [20, 100, 180], [0, 1, 3], ["zero", "one", "three"]
    write_shard(tmp_path / "z-0000.tar", [
        {"__key__": f"s{i}{j}", "jpg": _solid_jpeg(lv), "json": {"label": lab, "classname": name}}
        for i, (lv, lab, name) in enumerate(zip(levels, labels, names)) for j in range(2)])
    oracle = _Oracle(levels, {f"a {n}.": i for i, n in enumerate(names)})  # class i's prompt: image i's axis
    res = zero_shot(oracle, str(tmp_path), templates=["a {}."], threads=1)
    assert (res["top1"], res["samples"], res["classes"]) == (1.0, 6, 3)
    write_shard(tmp_path / "z-0001.tar", [{"__key__": "u", "jpg": _solid_jpeg(20), "json": {"label": 7}}])
    assert summary("zeroshot", "z", {**res, "skipped": {"no caption": 2}}).endswith("chance 33.3%; 2 skipped: "
                                                                                   "no caption 2)")
    with pytest.raises(ValueError, match="label 7 .* no sample with it carries a 'classname'"):
        zero_shot(oracle, str(tmp_path), templates=["a {}."], threads=1)


def test_a_meta_json_with_bad_classnames_or_templates_and_a_label_that_is_no_index_are_named(tmp_path):
    """meta.json's class names and templates are checked as --templates is (a template without {} scored near chance;
    class names as one string, one class a character), naming the file; a .json label that is not a class index is
    an error naming the sample, where int() raised with neither; a label "3" (a CSV column's) is taken."""
    from clipfast.data import write_shard
    from clipfast.evaluate import dataset_meta, zero_shot

    write_shard(tmp_path / "z-0000.tar", [{"__key__": f"s{i}", "jpg": _solid_jpeg(lv), "json": {"label": lab}}
                                          for i, (lv, lab) in enumerate([(20, 0), (180, "1")])])
    meta = tmp_path / "meta.json"
    oracle = _Oracle([20, 180], {"a zero.": 0, "a one.": 1})
    for bad, why in [({"classnames": "zero,one"}, '"classnames" must be a list of strings, got str "zero,one"'),
                     ({"templates": ["a {}.", "handwritten {name}"]}, "template 'handwritten {name}' needs one {}"),
                     ({"templates": ["a photo of the number"]}, "needs one {}"), ([1, 2], "not a JSON object")]:
        meta.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="meta.json .the evaluation set's class names and templates.: ") as e:
            dataset_meta(str(tmp_path))
        assert why in str(e.value)
    meta.write_text(json.dumps({"classnames": ["zero", "one"], "templates": ["a {}."]}))
    assert zero_shot(oracle, str(tmp_path), threads=1)["top1"] == 1.0
    write_shard(tmp_path / "z-0001.tar", [{"__key__": "named", "jpg": _solid_jpeg(20), "json": {"label": "eight"}}])
    with pytest.raises(ValueError, match="sample 'named' .* has label 'eight' in its .json: a class index"):
        zero_shot(oracle, str(tmp_path), threads=1)


def test_eval_sets_one_plain_or_several_named():
    from clipfast.evaluate import eval_sets

    assert eval_sets("data/in1k/val", "zeroshot") == [("zeroshot", "data/in1k/val")]
    assert eval_sets("", "zeroshot") == []
    assert eval_sets("in1k=data/a/val;c10=data/c10/test", "zeroshot") == [("zeroshot:in1k", "data/a/val"),
                                                                           ("zeroshot:c10", "data/c10/test")]
    assert eval_sets("data/coco/; data/flickr", "retrieval") == [("retrieval:coco", "data/coco/"),
                                                                  ("retrieval:flickr", "data/flickr")]
    assert eval_sets("coco=data/x", "retrieval") == [("retrieval:coco", "data/x")]  # one set, named: its name kept
    with pytest.raises(ValueError, match="two have the same name"):
        eval_sets("data/a/val;data/b/val", "zeroshot")


def test_named_prompt_sets():
    names = named_classnames("imagenet")
    assert len(names) == 1000 and names[0] == "tench" and named_classnames("a,b") == ["a", "b"]
    assert named_classnames("") is None and named_templates("") is None
    openai = named_templates("openai")
    assert len(openai) == 80 and all("{}" in t for t in openai) and len(named_templates("simple")) == 7
    assert named_templates("a {}|the {}") == ["a {}", "the {}"]
    with pytest.raises(ValueError, match="'a photo' needs one {}"):
        named_templates("a photo")
    for bad in ("a photo of a {{}}.", "a {} and a {}", "a {0}", "a {name}", "a {", "a }", "a {:d}", "a {!x}",
                "a {:{}}", "a {:,}"):  # {{}}: a literal pair; a format spec or conversion a name cannot take
        with pytest.raises(ValueError, match="needs one {}"):
            named_templates(bad)
    assert named_templates("a {{drawn}} {}") == ["a {{drawn}} {}"]


def test_class_names_and_templates_from_files_as_make_shards_takes_them(tmp_path):
    (tmp_path / "names.txt").write_text("zero\n\none two\n")
    (tmp_path / "tpl.txt").write_text("a {}.\nthe {}, drawn\n")
    assert named_classnames(str(tmp_path / "names.txt")) == ["zero", "one two"]
    assert named_templates(str(tmp_path / "tpl.txt")) == ["a {}.", "the {}, drawn"]
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(ValueError, match="'a photo' needs one {}"):
        named_templates(str(tmp_path / "bad.txt"))
    (tmp_path / "l1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="--classnames file .*l1.txt' is not UTF-8"):
        named_classnames(str(tmp_path / "l1.txt"))


def test_evaluate_cli_retrieval_and_a_label_without_a_class_name(data, tmp_path):
    from clipfast.checkpoint import save_model
    from clipfast.config import TrainConfig
    from clipfast.evaluate import main as evaluate_main
    from clipfast.evaluate import zero_shot
    from clipfast.model import CLIP
    from clipfast.presets import from_name

    model = CLIP(from_name("demo"), kernels="ref")
    save_model(tmp_path / "model.pt", model, TrainConfig(), step=0)
    res = evaluate_main(["--checkpoint", str(tmp_path), "--data", str(data / "val"), "--task", "retrieval",
                         "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "r.json")])
    assert res["images"] == res["captions"] == 359
    assert json.loads((tmp_path / "r.json").read_text())["t2i_r5"] == res["t2i_r5"]
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(tmp_path), "--data", str(data / "val"), "--templates", "no slot"])
    with pytest.raises(ValueError, match="label 9 .* 3 class names"):
        zero_shot(model.eval(), str(data / "val"), classnames=["a", "b", "c"], threads=1)


def _train(data, out, *overrides):
    cmd = [sys.executable, "clipfast/train.py", "--config", "configs/demo.py", "engine=torch", "steps=4",
           "log_every=2", "batch_size=16", "warmup_steps=1", "tensorboard=false", "data_threads=1",
           f"train_data={data / 'train'}", f"out_dir={out}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_trainer_evaluates_every_eval_every_steps(data, tmp_path):
    out = tmp_path / "run"
    r = _train(data, out, "eval_every=2", f"val_data={data / 'val'}", f"retrieval_data={data / 'val'}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]  # step 4 once: the final evaluation is also the 4th step's
    assert all(e["zeroshot"]["samples"] == 359 and e["retrieval"]["captions"] == 359 for e in evals)
    final = json.loads((out / "eval.json").read_text())
    assert final["top1"] == evals[-1]["zeroshot"]["top1"] and final["retrieval"] == evals[-1]["retrieval"]
    assert "retrieval on" in r.stdout and "zero-shot on" in r.stdout

    # several sets, named: a result per set, the first zero-shot set's at eval.json's top level
    out = tmp_path / "run2"
    r = _train(data, out, "steps=2", f"val_data=digits={data / 'val'};again={data / 'val'}",
               f"retrieval_data=held_out={data / 'val'}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (ev,) = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert list(ev) == ["step", "zeroshot:digits", "zeroshot:again", "retrieval:held_out"]
    assert ev["zeroshot:digits"] == ev["zeroshot:again"]  # the same set twice, the same model
    final = json.loads((out / "eval.json").read_text())
    assert final["top1"] == ev["zeroshot:digits"]["top1"] and "zeroshot:digits" not in final
    assert final["zeroshot:again"] == ev["zeroshot:again"] and final["retrieval:held_out"] == ev["retrieval:held_out"]


def test_a_missing_evaluation_set_is_named_before_training(data, tmp_path):
    r = _train(data, tmp_path / "run", f"val_data={data / 'val'}", f"retrieval_data={tmp_path / 'nowhere'}")
    assert r.returncode != 0 and "retrieval_data: no .tar shards found" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # where nothing is evaluated, the sets are not looked for (configs/demo.py names data/demo/val, which a fresh
    # clone has not built)
    r = _train(data, tmp_path / "run2", f"val_data={tmp_path / 'nowhere'}", "eval_at_end=false", "steps=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_text_classifier_batches_across_classes_as_one_class_at_a_time_does(data):
    from clipfast.evaluate import encode_captions, text_classifier, zero_shot
    from clipfast.model import CLIP
    from clipfast.presets import from_name

    torch.manual_seed(0)
    model = CLIP(from_name("demo"), kernels="ref").eval()
    names, templates = ["cat", "dog", "a small bird"], ["a photo of a {}.", "{}", "the {} again"]
    clf = text_classifier(model, names, templates, "cpu")
    for c, name in enumerate(names):
        one = F.normalize(encode_captions(model, [t.format(name) for t in templates], "cpu").mean(0), dim=-1)
        torch.testing.assert_close(clf[c], one, rtol=1e-5, atol=1e-6)
    # a bf16 model (the trainer's on a GPU): image features and classifier meet in float32
    res = zero_shot(model.to(torch.bfloat16), str(data / "val"), batch_size=128, threads=1)
    assert res["samples"] == 359


def test_open_clip_weights_evaluate_as_the_same_clipfast_model(data, tmp_path, monkeypatch):
    """--open-clip NAME: an open_clip state dict, converted through clipfast.interop, scores as the clipfast model it
    came from (the baseline and clipfast's own models evaluated the same way)."""
    import clipfast.interop as interop
    from clipfast.checkpoint import save_model
    from clipfast.config import TrainConfig
    from clipfast.evaluate import main as evaluate_main
    from clipfast.model import CLIP
    from clipfast.presets import from_name

    def demo_config(name, **kw):  # stands in for an open_clip name: no download, a tiny model
        assert name == "tiny-test-model"
        return from_name("demo")

    monkeypatch.setattr(interop, "config_from_open_clip", demo_config)
    torch.manual_seed(3)
    model = CLIP(from_name("demo"), kernels="ref")
    save_model(tmp_path / "model.pt", model, TrainConfig(), step=0)
    torch.save(interop.to_open_clip(model.state_dict()), tmp_path / "open_clip.pt")
    common = ["--data", str(data / "val"), "--device", "cpu", "--threads", "1", "--no-progress"]
    for task in ("zeroshot", "retrieval"):
        ours = evaluate_main(["--checkpoint", str(tmp_path / "model.pt"), "--task", task, *common])
        theirs = evaluate_main(["--checkpoint", str(tmp_path / "open_clip.pt"), "--open-clip", "tiny-test-model",
                                "--task", task, *common])
        assert ours == theirs

"""Zero-shot classification: class names × prompt templates -> text classifier -> top-1 / top-5.

    python -m clipfast.evaluate --checkpoint runs/demo/model.pt --data data/demo/val

Labels come from each sample's .json ("label"). Class names and templates come from --classnames /
--templates, else from a meta.json in the data folder or its parent ({"classnames": [...],
"templates": ["a photo of {}", ...]}), else from the samples' "classname" fields.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from clipfast.data import DaliLoader, pack_text
from clipfast.model import CLIP
from clipfast.presets import ModelConfig, TextConfig, VisionConfig
from clipfast.reduce import TextReducer

DEFAULT_TEMPLATES = ["a photo of a {}."]


def model_config_from_dict(d: dict) -> ModelConfig:
    return ModelConfig(**{**d, "vision": VisionConfig(**d["vision"]), "text": TextConfig(**d["text"])})


def load_model(checkpoint: str, device="cpu", kernels: str = "auto") -> CLIP:
    """A model saved by clipfast.train (`model.pt`, or a run folder holding one)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no clipfast model file at {checkpoint!r} (expected model.pt from clipfast.train)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a clipfast model file (no 'model_config'); open_clip files: clipfast.interop")
    model = CLIP(model_config_from_dict(ckpt["model_config"]), kernels=kernels)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def dataset_meta(data: str) -> dict:
    for folder in (Path(data), Path(data).parent):
        if (folder / "meta.json").is_file():
            return json.loads((folder / "meta.json").read_text())
    return {}


@torch.no_grad()
def text_classifier(model: CLIP, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """(C, E): per class, the normalised mean of its normalised prompt embeddings."""
    reducer = TextReducer("truncate", model.context_length)
    weights = []
    for name in classnames:
        text, cu, max_len = pack_text([reducer(t.format(name)) for t in templates])
        emb = model.encode_text_packed(text.to(device), cu.to(device), max_len, normalize=True)
        weights.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def zero_shot(model: CLIP, data: str, batch_size=256, classnames=None, templates=None, device="cpu",
              threads=2) -> dict:
    device = torch.device(device)
    meta = dataset_meta(data)
    templates = templates or meta.get("templates") or DEFAULT_TEMPLATES
    loader = DaliLoader(data, batch_size, model.cfg.vision.image_size, TextReducer("truncate", model.context_length),
                        train=False, threads=threads, device=device)
    feats, labels, names = [], [], {}
    for batch in loader:
        dtype = next(model.parameters()).dtype
        feats.append(model.encode_image(batch["images"], normalize=True).to(dtype))
        for m in batch["meta"]:
            if "label" not in m:
                raise ValueError(f"evaluation sample without a 'label' in its .json: {m}")
            labels.append(int(m["label"]))
            if "classname" in m:
                names[int(m["label"])] = m["classname"]
    if not labels:
        raise ValueError(f"no evaluation samples in {data!r}")
    classnames = classnames or meta.get("classnames") or [names[i] for i in sorted(names)]
    clf = text_classifier(model, classnames, templates, device)
    logits = torch.cat(feats) @ clf.T  # (N, C)
    y = torch.tensor(labels, device=logits.device)
    topk = logits.topk(min(5, len(classnames)), dim=1).indices
    return {
        "top1": (topk[:, 0] == y).float().mean().item(),
        "top5": (topk == y[:, None]).any(dim=1).float().mean().item(),
        "samples": len(labels),
        "classes": len(classnames),
        "skipped": loader.skipped,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model.pt written by clipfast.train, or its run folder")
    ap.add_argument("--data", required=True, help="held-out shards with class labels in .json")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--classnames", default="", help="comma-separated, in label order")
    ap.add_argument("--templates", default="", help="'|'-separated prompts with {} for the class name")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    model = load_model(args.checkpoint, args.device)
    res = zero_shot(model, args.data, args.batch_size, [c for c in args.classnames.split(",") if c] or None,
                    [t for t in args.templates.split("|") if t] or None, args.device)
    print(f"zero-shot on {args.data}: top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  "
          f"({res['samples']} samples, {res['classes']} classes, chance {100 / res['classes']:.1f}%)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

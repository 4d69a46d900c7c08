"""Export a clipfast model to open_clip, or import open_clip weights as a clipfast model file.

    python -m clipfast.export --checkpoint runs/demo/model.pt --out model_open_clip.pt
    python -m clipfast.export --from-open-clip ViT-B-16 --weights open_clip.pt --out model.pt [--image-size 112]

The first writes a state dict that `open_clip.create_model(NAME, **KWARGS).load_state_dict(...)` accepts and
prints NAME and KWARGS (also written beside the file as <out>.json); unless --no-check, it builds that open_clip
model and loads the file strictly before it says so. The second writes a clipfast model.pt (the layout
clipfast.train saves: model_config + state_dict) from open_clip weights, position embeddings resized to
--image-size / --context-length, for clipfast.evaluate or as the start of a fine-tune.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from clipfast.checkpoint import read_model_file
from clipfast.interop import config_from_open_clip, export_kwargs, load_open_clip_state, open_clip_name, to_open_clip


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """(model_config dict, state_dict) of a clipfast model.pt (a run folder holding one, or one of the run's
    checkpoints, <run>/ckpt/step<N>)."""
    ckpt = read_model_file(path)
    return ckpt["model_config"], ckpt["state_dict"]


def export_open_clip(checkpoint: str, out: str, check: bool = True) -> tuple[str, dict]:
    from clipfast.evaluate import model_config_from_dict

    cfg_dict, sd = read_checkpoint(checkpoint)
    cfg = model_config_from_dict(cfg_dict)
    name, kwargs = open_clip_name(cfg)
    sd = to_open_clip(sd)
    torch.save(sd, out)
    info = {"model_name": name, "kwargs": kwargs, "context_length": cfg.text.context_length,
            "image_size": cfg.vision.image_size, "clipfast_model": cfg.name}
    Path(str(out) + ".json").write_text(json.dumps(info, indent=1) + "\n")
    if check:
        import open_clip

        model = open_clip.create_model(name, **kwargs)
        model.load_state_dict(torch.load(out, map_location="cpu", weights_only=True))  # strict
    return name, kwargs


def import_open_clip(name: str, weights: str, out: str, image_size: int | None = None,
                     context_length: int | None = None, **create_kwargs) -> None:
    from clipfast.model import CLIP

    cfg = config_from_open_clip(name, **create_kwargs)
    if image_size:
        cfg.vision.image_size = image_size
    if context_length:
        cfg.text.context_length = context_length
    model = CLIP(cfg, kernels="ref")
    load_open_clip_state(model, weights)  # cfg came from config_from_open_clip: already checked
    torch.save({"model_config": dataclasses.asdict(cfg), "state_dict": model.state_dict(),
                "train_config": {"open_clip": {"model_name": name, "weights": str(weights), **create_kwargs}},
                "step": 0}, out)


def info_len(out: str) -> int:
    return json.loads(Path(str(out) + ".json").read_text())["context_length"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="clipfast model.pt (or run folder) to export to open_clip")
    ap.add_argument("--from-open-clip", metavar="NAME", help="open_clip model name of --weights, to import")
    ap.add_argument("--weights", help="open_clip state dict file (with --from-open-clip)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--image-size", type=int, help="with --from-open-clip: the clipfast model's image size")
    ap.add_argument("--context-length", type=int, help="with --from-open-clip: the clipfast text length")
    ap.add_argument("--no-check", action="store_true", help="skip building the open_clip model to test the file")
    args = ap.parse_args(argv)
    if bool(args.checkpoint) == bool(args.from_open_clip):
        ap.error("give exactly one of --checkpoint (export) and --from-open-clip (import)")
    if args.checkpoint and (args.image_size or args.context_length):
        ap.error("--image-size and --context-length are for --from-open-clip (an export keeps the model's own)")
    out_dir = Path(args.out).parent
    if not out_dir.is_dir():
        ap.error(f"--out {args.out!r}: no folder {str(out_dir)!r} to write it in")
    try:
        _run(args, ap)
    except (FileNotFoundError, ValueError) as e:  # (the inputs' fault: said in a line, no traceback)
        ap.error(str(e))


def _run(args, ap) -> None:
    if args.checkpoint:
        name, kwargs = export_open_clip(args.checkpoint, args.out, check=not args.no_check)
        print(f"open_clip model name: {name}")
        print(f"open_clip kwargs: {json.dumps(kwargs)}")
        args_txt = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        print(f"model = open_clip.create_model({name!r}{args_txt})\n"
              f"model.load_state_dict(torch.load({args.out!r}))" + ("  # checked" if not args.no_check else "") +
              f"\ntokenizer = open_clip.get_tokenizer({name!r}, context_length={info_len(args.out)})")
    else:
        if not args.weights:
            ap.error("--from-open-clip needs --weights")
        kwargs = export_kwargs(args.weights, args.from_open_clip)  # (a file clipfast.export wrote: its kwargs)
        if kwargs:
            print(f"open_clip kwargs from {args.weights}.json: {json.dumps(kwargs)}")
        import_open_clip(args.from_open_clip, args.weights, args.out, args.image_size, args.context_length, **kwargs)
        print(f"wrote clipfast model file {args.out}")


if __name__ == "__main__":
    main()

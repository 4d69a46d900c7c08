"""Your own data as clipfast shards: an ImageFolder tree, a CSV/TSV of image paths and captions, COCO captions.

    python -m clipfast.data.make_shards --image-folder imagenet/val --classnames imagenet --out data/in1k-val
    python -m clipfast.data.make_shards --csv pairs.tsv --sep '\\t' --out data/mine
    python -m clipfast.data.make_shards --coco-captions captions_val2017.json --images val2017 --out data/coco5k
    python -m clipfast.data.make_shards --karpathy dataset_coco.json --split test --images coco --out data/coco5k

--image-folder DIR (zero-shot classification): class = the immediate subfolder (folders starting with "." are not
classes), label = its index in sorted folder order, torchvision's ImageFolder convention; every file below it (sorted,
symlinks followed) is a sample. Each sample's .txt is "a photo of a {classname}." (clipfast.evaluate's default
prompt) and its .json {"label", "classname", "source"}. OUT/meta.json holds {"classnames", "templates", "counts",
"class_counts", "folders"}, what clipfast.evaluate reads. Class names: the folder names with "_" as spaces, or
--classnames imagenet (1000 wnid folders -> open_clip's IMAGENET_CLASSNAMES), or a file with one per line in sorted
folder order. --templates simple (default: open_clip's SIMPLE_IMAGENET_TEMPLATES, the 7 of the 80 that OpenAI's
prompt-engineering notebook selected: an 11th of the text encoding), openai (all 80 of the CLIP paper), none
(meta.json then names none and the evaluation uses its default), or a file with one template per line, each with {}.

--csv FILE (training pairs): columns --image-col (filepath) and --caption-col (title), open_clip's CSV convention;
--sep '\\t' for TSV. Image paths are relative to the CSV's folder (or --root) unless absolute. The .json holds
{"source": path as written} and the columns named by --keep-cols.

--coco-captions FILE --images DIR (retrieval): one sample per image, in the file's image order; the .txt is its
first caption, the .json {"captions": all of them in annotation order, "image_id", "source"}. --karpathy FILE
--split test --images DIR does the same for Karpathy's split files (the standard COCO 5k and Flickr30k 1k test
sets); --split takes a comma list (train,restval).

Images: a complete JPEG or PNG in RGB or grayscale is stored byte for byte (key.jpg / key.png; a 16-bit RGB PNG too,
which DALI decodes). Any other (WebP, BMP, GIF, TIFF, CMYK JPEG, palette or 16-bit grayscale PNG, ...), and with
--max-side N one whose longer side is above N, is decoded with PIL, turned upright by its EXIF orientation, converted
to RGB (16-bit grayscale scaled to 8 bits, a float image's 0-1 to 0-255; other ranges skipped), shrunk to a longer
side of at most N (never enlarged) and re-encoded as JPEG at --quality. Every image is decoded once to check it (a
kept JPEG at 1/8 scale, which still reads all of its data).

Keys are {prefix}{i:08d} with i the input's index (sorted files, CSV row, annotation-file order), so a key names its
source even across skips; shards are OUT/{prefix}-NNNN.tar, --samples-per-shard each. A missing or undecodable image,
an empty caption or a bad CSV row is skipped, counted by reason and logged with its source path, never fatal;
OUT/make_shards.json holds the counts, the first 1000 skipped sources, the shards, the options and the command.
OUT must hold no .tar shards (a folder is read whole), unless --overwrite, which first removes its .tar files.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shlex
import sys
from collections import Counter
from pathlib import Path

from clipfast import prompts
from clipfast.data.shard_writer import Item, UsageError, check_prefix, prepare_out, write_samples

log = logging.getLogger("clipfast.data")
CAPTION = "a photo of a {}."  # the .txt of a classification sample: clipfast.evaluate's DEFAULT_TEMPLATES[0]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
PREFIXES = {"image_folder": "val", "csv": "train", "coco_captions": "retrieval", "karpathy": "retrieval"}


def _lines(path: str, what: str) -> list[str]:
    if not Path(path).is_file():
        raise UsageError(f"{what} {path!r}: no such file")
    try:
        return prompts.lines_of(path, what)
    except ValueError as e:  # (not UTF-8)
        raise UsageError(str(e)) from None


def resolve_templates(spec: str) -> list[str]:
    if spec == "none":
        return []
    if spec in prompts.TEMPLATE_SETS:
        return prompts.template_set(spec)
    if not Path(spec).is_file():
        raise UsageError(f"unknown --templates {spec!r}: {', '.join(prompts.TEMPLATE_SETS)}, none, or a file with one "
                         "template per line")
    templates = _lines(spec, "--templates")
    for n, t in enumerate(templates, 1):
        if prompts.template_problem(t):
            raise UsageError(f"--templates {spec!r}: template {n} ({t!r}) needs one {{}} for the class name")
    return templates


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(name: str) -> str:
    """A file name as it can be printed and stored: its undecodable bytes as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _classes(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise UsageError(f"--image-folder {str(folder)!r}: no such folder")
    folders = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    for f in folders:  # (a name in another encoding: os gives it with surrogates, which the .json cannot hold)
        if not _utf8(f):
            raise UsageError(f"--image-folder {str(folder)!r}: the class folder '{_shown(f)}' is not named in UTF-8 "
                             "(rename it, e.g. with convmv)")
    hidden = [f for f in folders if f.startswith(".")]
    if hidden:  # .ipynb_checkpoints, .git: a class for torchvision, which shifts every label after it
        log.warning("ignoring hidden folder(s) in %s: %s", folder, ", ".join(hidden))
        folders = [f for f in folders if not f.startswith(".")]
    if not folders:
        raise UsageError(f"--image-folder {str(folder)!r} has no class subfolders (expected DIR/<class>/<image>)")
    return folders


def resolve_classnames(spec: str | None, folders: list[str]) -> list[str]:
    """None: folder names with "_" as spaces; "imagenet": open_clip's names for the sorted wnids; else a file."""
    if not spec:
        return [f.replace("_", " ") for f in folders]
    if spec == "imagenet":
        names = prompts.imagenet_classnames()
        if len(folders) != len(names):
            raise UsageError(f"--classnames imagenet needs the {len(names)} ImageNet class folders; "
                             f"found {len(folders)}")
        bad = next((f for f in folders if not re.fullmatch(r"n\d{8}", f)), None)
        if bad:  # 1000 folders named otherwise would sort in another order: the names would be wrong, silently
            raise UsageError(f"--classnames imagenet needs wnid folders (n01440764, ...); found {bad!r}")
        return names
    names = _lines(spec, "--classnames")
    if len(names) != len(folders):
        raise UsageError(f"--classnames {spec!r} has {len(names)} names for {len(folders)} class folders")
    return names


def from_image_folder(folder, out, classnames: str | None = None, templates: str = "simple", *, prefix="val",
                      overwrite=False, **kw) -> dict:
    """A DIR/<class>/<image> tree -> labelled shards + meta.json (module docstring); -> the summary. `kw`: the
    options of write_samples."""
    folder, out = Path(folder), Path(out)
    folders = _classes(folder)
    names, temps = resolve_classnames(classnames, folders), resolve_templates(templates)
    prepare_out(out, overwrite)
    files = []  # (label, path) in torchvision's ImageFolder order
    for label, f in enumerate(folders):
        for root, _, fnames in sorted(os.walk(folder / f, followlinks=True)):
            files += [(label, Path(root) / n) for n in sorted(fnames)]
    per_class = Counter(label for label, _ in files)
    empty = [f for label, f in enumerate(folders) if not per_class[label]]
    if empty:
        log.warning("%d class folder(s) hold no files: %s", len(empty), ", ".join(empty[:10]))
    stray = sorted(p.name for p in folder.iterdir() if not p.is_dir())

    def items():
        for name in stray:
            yield Item(_shown(name), None, problem="not in a class folder")
        for label, p in files:
            src = p.relative_to(folder).as_posix()
            bad = None if p.suffix.lower() in IMAGE_SUFFIXES else f"not an image file ({p.suffix or 'no suffix'})"
            if not _utf8(src):
                src, bad = _shown(src), "its path is not UTF-8 (the sample's .json names it)"
            yield Item(src, p, CAPTION.format(names[label]), {"label": label, "classname": names[label],
                                                                "source": src}, bad)

    per_label: Counter = Counter()
    kw["extra"] = {"source": {"image_folder": str(folder)}, "classes": len(folders), "classnames": classnames,
                   "templates": templates}
    res = write_samples(items(), out, prefix, total=len(stray) + len(files), **kw,
                        on_write=lambda it: per_label.update([it.meta["label"]]))
    meta = {"classnames": names, "templates": temps, "counts": {prefix: res["written"]},
            "class_counts": [per_label[i] for i in range(len(folders))], "folders": folders}
    if not temps:
        del meta["templates"]
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return res


def _separator(sep: str) -> str:
    sep = {"\\t": "\t", "tab": "\t"}.get(sep, sep)
    if len(sep) != 1:
        raise UsageError(f"--sep must be one character ('\\t' for TSV), got {sep!r}")
    return sep


def _swallowed_rows(row: dict, sep: str, columns: int) -> bool:
    """Whether a row read over several lines holds a field whose later lines look like rows of their own (as many
    separators as a row has): a quote left open, not a caption with a line break (which a CSV writer quotes)."""
    for v in row.values():
        if isinstance(v, str) and ("\n" in v or "\r" in v):
            if any(ln.count(sep) >= max(1, columns - 1) for ln in v.splitlines()[1:]):
                return True
    return False


def from_csv(path, out, image_col="filepath", caption_col="title", sep=",", root=None, keep_cols=(), *,
             prefix="train", overwrite=False, **kw) -> dict:
    """A CSV/TSV of image paths and captions -> training shards; -> the summary. `kw`: write_samples' options."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise UsageError(f"--csv {str(path)!r}: no such file")
    base = Path(root) if root else path.parent
    if root and not base.is_dir():
        raise UsageError(f"--root {root!r}: no such folder")
    # utf-8-sig: a BOM would otherwise join the first column's name; surrogateescape: bytes that are not UTF-8
    # fail their row (below), not the whole file
    f = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    try:
        delimiter = _separator(sep)
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        for what, col in [("--image-col", image_col), ("--caption-col", caption_col)] + [
                ("--keep-cols", c) for c in keep_cols]:
            if col not in columns:
                raise UsageError(f"--csv {str(path)!r} has no column {col!r} ({what}); its columns: "
                                 f"{', '.join(map(repr, columns)) or 'none'}")
        prepare_out(out, overwrite)

        def items():
            while True:
                first = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:  # e.g. a field over csv.field_size_limit(); the DictReader's line_num lags
                    yield Item(f"{path.name}:{reader.reader.line_num}", None, problem=f"bad CSV row ({e})")
                    continue
                line, last = f"{path.name}:{reader.line_num}", reader.line_num
                wrong = None in row or None in row.values()  # more or fewer fields than the header
                if last > first and (wrong or _swallowed_rows(row, delimiter, len(columns))):
                    # a quote not closed where it should be: the lines after it read as part of this row's field.
                    # Each line is a row lost: one skip each, all naming the line the quote opened on
                    for n in range(first, last + 1):
                        yield Item(f"{path.name}:{n}", None, problem=f"bad CSV row (lines {first}-{last} read as one "
                                   f"row: a quote opened on line {first} is not closed where it should be)")
                    continue
                if wrong:
                    n = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                    yield Item(line, None, problem=f"bad CSV row ({n} fields for {len(columns)} columns)")
                    continue
                src = row[image_col].strip()
                try:
                    "".join(row.values()).encode("utf-8")
                except UnicodeEncodeError:
                    yield Item(f"{line} {src!r}", None, problem="bad CSV row (not UTF-8)")
                    continue
                if not src:
                    yield Item(line, None, problem="bad CSV row (no image path)")
                    continue
                meta = {"source": src, **{c: row[c] for c in keep_cols}}
                yield Item(f"{line} {src}", base / src, row[caption_col], meta)

        kw["extra"] = {"source": {"csv": str(path), "root": str(base)}, "image_col": image_col,
                       "caption_col": caption_col, "keep_cols": list(keep_cols)}
        return write_samples(items(), out, prefix, **kw)
    finally:
        f.close()


def _load_json(path, flag: str, needs: tuple[str, ...], hint: str = "") -> dict:
    if not Path(path).is_file():
        raise UsageError(f"{flag} {str(path)!r}: no such file")
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {str(path)!r} is not JSON ({e})") from None
    missing = [k for k in needs if not isinstance(d, dict) or not isinstance(d.get(k), list)]
    if missing:
        raise UsageError(f"{flag} {str(path)!r} has no {' or '.join(map(repr, missing))} list{hint}")
    return d


def _images_dir(images) -> Path:
    if not Path(images).is_dir():
        raise UsageError(f"--images {str(images)!r}: no such folder")
    return Path(images)


def from_coco(annotations, images, out, *, prefix="retrieval", overwrite=False, **kw) -> dict:
    """COCO captions (images [{id, file_name}], annotations [{image_id, caption}]) -> one sample per image with all
    its captions in its .json; -> the summary. `kw`: write_samples' options."""
    d = _load_json(annotations, "--coco-captions", ("images", "annotations"),
                   " (COCO captions format; for a Karpathy split file use --karpathy)")
    images, out = _images_dir(images), Path(out)
    prepare_out(out, overwrite)
    captions: dict = {}
    for a in d["annotations"]:
        captions.setdefault(a.get("image_id"), []).append(str(a.get("caption") or "").strip())
    known = {im.get("id") for im in d["images"]}
    orphans = sum(len(v) for k, v in captions.items() if k not in known)

    def items():
        for im in d["images"]:
            name = str(im.get("file_name") or "")
            caps = [c for c in captions.get(im.get("id"), []) if c]
            meta = {"captions": caps, "image_id": im.get("id"), "source": name}
            if not name:
                yield Item(f"image id {im.get('id')}", None, problem="no file_name")
            else:
                yield Item(name, images / name, caps[0] if caps else "", meta, None if caps else "no caption")

    kw["extra"] = {"source": {"coco_captions": str(annotations), "images": str(images)},
                   "captions_without_image": orphans,
                   "empty_captions": sum(not c for v in captions.values() for c in v)}
    return write_samples(items(), out, prefix, total=len(d["images"]), **kw)


def from_karpathy(split_file, images, out, split="test", *, prefix="retrieval", overwrite=False, **kw) -> dict:
    """Karpathy's split file (images [{filepath, filename, split, sentences [{raw}]}]) -> the images of `split`
    (a comma list), one sample each with all its captions; -> the summary. `kw`: write_samples' options."""
    d = _load_json(split_file, "--karpathy", ("images",))
    images, out = _images_dir(images), Path(out)
    splits = [s.strip() for s in split.split(",") if s.strip()]
    found = Counter(im.get("split") for im in d["images"])
    unknown = [s for s in splits if s not in found]
    if unknown or not splits:
        raise UsageError(f"--split {split!r}: {str(split_file)!r} has the splits "
                         f"{', '.join(f'{k} ({v} images)' for k, v in sorted(found.items(), key=str))}")
    prepare_out(out, overwrite)
    chosen = [im for im in d["images"] if im.get("split") in splits]

    def items():
        for im in chosen:
            rel = "/".join(p for p in (im.get("filepath"), im.get("filename")) if p)
            caps = [c for c in (str((s.get("raw") if isinstance(s, dict) else s) or "").strip()  # (or plain strings)
                                for s in im.get("sentences") or []) if c]
            meta = {"captions": caps, "image_id": im.get("cocoid", im.get("imgid")), "source": rel}
            yield Item(rel or f"imgid {im.get('imgid')}", images / rel if rel else None, caps[0] if caps else "",
                       meta, None if caps else "no caption" if rel else "no filename")

    kw["extra"] = {"source": {"karpathy": str(split_file), "images": str(images)}, "split": splits,
                   "images_in_file": dict(found)}
    return write_samples(items(), out, prefix, total=len(chosen), **kw)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-folder", metavar="DIR", help="DIR/<class>/<image>: zero-shot classification shards")
    src.add_argument("--csv", metavar="FILE", help="a CSV/TSV of image paths and captions: training shards")
    src.add_argument("--coco-captions", metavar="FILE", help="COCO captions annotations (with --images)")
    src.add_argument("--karpathy", metavar="FILE", help="Karpathy's dataset_{coco,flickr30k}.json (with --images)")
    ap.add_argument("--out", required=True, help="folder for the shards, make_shards.json [and meta.json]")
    ap.add_argument("--prefix", default=None, help="shard and key prefix (default: val, train, retrieval by source)")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--max-side", type=int, default=0, help="shrink images above this longer side (0: keep bytes)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    ap.add_argument("--workers", type=int, default=4, help="image reading/encoding threads")
    ap.add_argument("--limit", type=int, default=0, help="only the first N inputs (0: all)")
    ap.add_argument("--overwrite", action="store_true", help="remove OUT's .tar shards first")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g = ap.add_argument_group("--image-folder")
    g.add_argument("--classnames", default=None, help="imagenet, or a file of names in sorted folder order "
                   "(default: folder names, _ as space)")
    g.add_argument("--templates", default="simple", help="openai, simple, none, or a file of templates with {}")
    g = ap.add_argument_group("--csv")
    g.add_argument("--image-col", default="filepath")
    g.add_argument("--caption-col", default="title")
    g.add_argument("--sep", default=",", help="field separator; '\\t' for TSV")
    g.add_argument("--root", default=None, help="folder the image paths are relative to (default: the CSV's)")
    g.add_argument("--keep-cols", default="", help="comma list of columns copied into each sample's .json")
    g = ap.add_argument_group("--coco-captions / --karpathy")
    g.add_argument("--images", default=None, metavar="DIR", help="the folder the annotation paths are relative to")
    g.add_argument("--split", default="test", help="--karpathy: the split(s) to write, a comma list")
    args = ap.parse_args(argv)
    for name in ("samples_per_shard", "workers", "quality"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("max_side", "limit"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.quality > 100:
        ap.error(f"--quality is a JPEG quality, 1 to 100; got {args.quality}")
    if (args.coco_captions or args.karpathy) and not args.images:
        ap.error("--coco-captions and --karpathy need --images DIR, the folder of the images")
    kind = next(k for k in PREFIXES if getattr(args, k))
    command = shlex.join([Path(sys.executable).name, "-m", "clipfast.data.make_shards",
                          *(sys.argv[1:] if argv is None else argv)])
    kw = dict(prefix=args.prefix or PREFIXES[kind], overwrite=args.overwrite, samples_per_shard=args.samples_per_shard,
              max_side=args.max_side, quality=args.quality, workers=args.workers, limit=args.limit or None,
              progress=not args.no_progress, command=command)
    try:
        check_prefix(kw["prefix"])
        if kind == "image_folder":
            res = from_image_folder(args.image_folder, args.out, args.classnames, args.templates, **kw)
        elif kind == "csv":
            res = from_csv(args.csv, args.out, args.image_col, args.caption_col, args.sep, args.root,
                           [c.strip() for c in args.keep_cols.split(",") if c.strip()], **kw)
        elif kind == "coco_captions":
            res = from_coco(args.coco_captions, args.images, args.out, **kw)
        else:
            res = from_karpathy(args.karpathy, args.images, args.out, args.split, **kw)
    except UsageError as e:
        ap.error(str(e))
    print(f"wrote {res['written']} of {res['inputs']} samples ({res['copied']} images byte for byte, "
          f"{res['re_encoded']} re-encoded) to {len(res['shards'])} shard(s) in {args.out}; skipped "
          f"{res['skipped_total']}{': ' + json.dumps(res['skipped']) if res['skipped'] else ''}; "
          f"{res['seconds']:.1f} s")
    if not res["written"]:
        if not res["inputs"]:
            raise SystemExit(f"make_shards: no samples written: the input holds none ({kind.replace('_', ' ')})")
        raise SystemExit(f"make_shards: no samples written, all {res['inputs']} skipped "
                         f"({json.dumps(res['skipped'])}; each logged above with its reason)"
                         + ("; are the image paths relative to --root (default: the CSV's folder)?"
                            if kind == "csv" and "missing file" in res["skipped"] else ""))
    return res


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()

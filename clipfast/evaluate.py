"""Zero-shot evaluation: classification (top-1 / top-5) and image-text retrieval (recall@1/5/10 both ways).

    python -m clipfast.evaluate --checkpoint runs/demo/model.pt --data data/demo/val
    python -m clipfast.evaluate --checkpoint runs/demo/model.pt --data data/coco_test --task retrieval
    python -m clipfast.evaluate --checkpoint run/ --data data/imagenet_val --classnames imagenet --templates openai
    python -m clipfast.evaluate --open-clip ViT-B-16 --checkpoint open_clip_b16.bin --data data/imagenet_val ...

Classification: class names × prompt templates -> text classifier. Labels come from each sample's .json
("label"). Class names and templates come from --classnames / --templates (a list, or a named set: `imagenet`
class names, `openai` / `simple` templates, from open_clip's zero-shot metadata), else from a meta.json in the data
folder or its parent ({"classnames": [...], "templates": ["a photo of {}", ...]}), else from the samples'
"classname" fields.

Retrieval: every image against every caption. A sample's captions are its .json "captions" list (COCO and Flickr
have five per image) or else its .txt. Image -> text: a hit at K when one of the image's own captions is among the K
best; text -> image: when the caption's image is. Ties (captions that read the same, as on the demo data, have the
same embedding) are broken at random, in expectation: with r wrong answers scoring above the best right one, and f
wrong and m right ones tied with it (an image's several captions may tie), the hit at K has probability
1 - prod_{j < K - r} (f - j) / (f + m - j), the chance that the tied ones' random order puts a right one among the
first K - r; with one right answer (m = 1), (K - r) / (f + 1), clamped to [0, 1].
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from clipfast import prompts
from clipfast.data import DaliLoader, pack_text
from clipfast.data.shards import list_shards
from clipfast.model import CLIP
from clipfast.presets import ModelConfig, TextConfig, VisionConfig
from clipfast.reduce import TextReducer

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ["a photo of a {}."]
RECALL_AT = (1, 5, 10)


def gather_rows(t: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's rows of `t` (N_r, ...), concatenated in rank order on every rank (all_gather, padded to the
    largest N_r). A collective: every rank calls it."""
    if world == 1:
        return t
    import torch.distributed as dist

    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(x) for x in sizes]
    full = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    full[: t.shape[0]] = t
    parts = [torch.empty_like(full) for _ in range(world)]
    dist.all_gather(parts, full)
    return torch.cat([p[:k] for p, k in zip(parts, sizes, strict=True)])


def gather_objects(obj, world: int) -> list:
    """[every rank's obj] on every rank (a collective)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def raise_any(error: Exception | None, world: int) -> None:
    """Raise on every rank the first rank's error, if any rank had one: a rank that raised alone would leave the others
    waiting in the next collective."""
    errors = [e for e in gather_objects(error, world) if e is not None]
    if errors:
        raise errors[0]


def summed(counts: dict, world: int) -> dict:
    total: dict = {}
    for c in gather_objects(dict(counts), world):
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _file_lines(spec: str, what: str) -> list[str] | None:
    """The non-blank lines of the file `spec` names (as make_shards takes class names and templates), or None where
    it names no file."""
    if not spec or not os.path.isfile(spec):
        return None
    return prompts.lines_of(spec, f"{what} file")


def named_classnames(spec: str) -> list[str] | None:
    """`imagenet` -> the 1000 ImageNet class names in sorted-wnid order (clipfast.prompts), a file -> its lines, a
    comma-separated list -> that list, "" -> None (the data's)."""
    if spec == "imagenet":
        return prompts.imagenet_classnames()
    lines = _file_lines(spec, "--classnames")
    if lines is not None:
        return lines or None
    return [c for c in spec.split(",") if c] or None


def named_templates(spec: str) -> list[str] | None:
    """`openai` (CLIP's 80 ImageNet prompts) / `simple` (open_clip's 7) -> those templates with {} for the class
    name (clipfast.prompts), a '|'-separated list -> that list, "" -> None (the data's)."""
    if spec in prompts.TEMPLATE_SETS:
        return prompts.template_set(spec)
    templates = _file_lines(spec, "--templates")
    templates = [t for t in spec.split("|") if t] if templates is None else templates
    for t in templates:
        if prompts.template_problem(t):
            raise ValueError(f"{prompts.template_problem(t)} (or name a set: {', '.join(prompts.TEMPLATE_SETS)})")
    return templates or None


def model_config_from_dict(d: dict) -> ModelConfig:
    return ModelConfig(**{**d, "vision": VisionConfig(**d["vision"]), "text": TextConfig(**d["text"])})


def load_model(checkpoint: str, device="cpu", kernels: str = "auto", open_clip_name: str | None = None) -> CLIP:
    """A model saved by clipfast.train (`model.pt`, a run folder holding one, or one of the run's checkpoints
    `<run>/ckpt/step<N>`), in eval mode; with open_clip_name,
    that open_clip model's state dict in `checkpoint`, through clipfast.interop (architectures clipfast's CLIP has;
    no download)."""
    if open_clip_name is not None:
        from clipfast.interop import config_from_open_clip, export_kwargs, load_open_clip_state, pretrained_differences

        differ = pretrained_differences(open_clip_name)
        if differ:
            log.warning("open_clip's pretrained %s weights with these tags were trained on inputs or with an "
                        "activation other than clipfast computes (OpenAI's mean/std, the shorter side resized "
                        "bicubic, GELU): %s. If %s holds one of them, its scores here are not open_clip's",
                        open_clip_name, "; ".join(differ), checkpoint)

        kwargs = export_kwargs(checkpoint, open_clip_name)  # (a file clipfast.export wrote: its create_model kwargs)
        model = CLIP(config_from_open_clip(open_clip_name, **kwargs), kernels=kernels)
        load_open_clip_state(model, checkpoint, open_clip_model=open_clip_name, **kwargs)
        return model.to(device).eval()
    from clipfast.checkpoint import read_model_file

    ckpt = read_model_file(checkpoint)  # (model.pt, a run folder, or a checkpoint of it: <run>/ckpt/step<N>)
    model = CLIP(model_config_from_dict(ckpt["model_config"]), kernels=kernels)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def meta_problem(meta) -> str | None:
    """What is wrong with an evaluation set's meta.json (read as JSON), or None: an object whose "classnames" and
    "templates", where given, are lists of strings, each template with one {} for the class name."""
    if not isinstance(meta, dict):
        return f"not a JSON object (a {type(meta).__name__})"
    for key in ("classnames", "templates"):
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            return f'"{key}" must be a list of strings, got {type(value).__name__} {json.dumps(value)[:80]}'
    for t in meta.get("templates") or []:
        if prompts.template_problem(t):
            return prompts.template_problem(t)
    return None


def dataset_meta(data: str) -> dict:
    """The meta.json (class names, templates) of an evaluation set: in the folder of its shards or the one above
    (make_shards writes it beside them, clipfast.data.demo one level up), however `data` names the shards (a folder,
    a glob, a brace pattern, a list); {} where there is none. Several that differ: the first, with a warning."""
    try:
        folders = list(dict.fromkeys(Path(s).parent for s in list_shards(data)))
    except (FileNotFoundError, ValueError):
        folders = [Path(data)]  # (the loader will name what is missing)
    found = {}
    for folder in folders:
        path = next((f / "meta.json" for f in (folder, folder.parent) if (f / "meta.json").is_file()), None)
        if path is not None and path not in found:
            try:
                found[path] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} (the evaluation set's class names and templates) does not parse: {e}") \
                    from None
            problem = meta_problem(found[path])
            if problem:
                raise ValueError(f"{path} (the evaluation set's class names and templates): {problem}")
    if not found:
        return {}
    (first, meta), *others = found.items()
    differ = [str(p) for p, m in others if m != meta]
    if differ:
        log.warning("evaluation set %r: %s and %s differ; using the first", data, first, ", ".join(differ))
    return meta


@torch.no_grad()
def encode_captions(model: CLIP, captions: list[str], device, batch_size: int = 256, progress: bool = False
                    ) -> torch.Tensor:
    """(N, E) float32, normalised: the captions BPE'd and truncated to the model's text length, in batches."""
    from tqdm import tqdm

    reducer = TextReducer("truncate", model.context_length)
    out = []
    for i in tqdm(range(0, len(captions), batch_size), desc="captions", unit="batch", disable=not progress):
        text, cu, max_len = pack_text([reducer(c) for c in captions[i : i + batch_size]])
        out.append(model.encode_text_packed(text.to(device), cu.to(device), max_len, normalize=True).float())
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim, device=device)


@torch.no_grad()
def text_classifier(model: CLIP, classnames: list[str], templates: list[str], device, progress: bool = False
                    ) -> torch.Tensor:
    """(C, E) float32: per class, the normalised mean of its normalised prompt embeddings. The prompts go in batches
    of 1024 across classes (ImageNet's 1000 x 80: 79 batches, not 1000 of 80)."""
    prompts = [t.format(name) for name in classnames for t in templates]
    emb = encode_captions(model, prompts, device, batch_size=1024, progress=progress)
    return F.normalize(emb.view(len(classnames), len(templates), emb.shape[-1]).mean(dim=1), dim=-1)


def class_index(label) -> int | None:
    """A sample's .json "label" as a class index: an integer, or a string of one (a CSV column's); else None."""
    if isinstance(label, int) and not isinstance(label, bool):
        return label
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label)
    return None


@torch.no_grad()
def zero_shot(model: CLIP, data: str, batch_size=256, classnames=None, templates=None, device="cpu",
              threads=2, progress: bool = False, rank: int = 0, world: int = 1) -> dict:
    """Top-1 / top-5 over `data`. With world > 1 every rank (a collective) encodes its share of the images (the
    shards split as for training) and of the classes, and every rank returns the whole set's result."""
    from tqdm import tqdm

    device = torch.device(device)
    meta = dataset_meta(data)
    templates = templates or meta.get("templates") or DEFAULT_TEMPLATES
    loader = DaliLoader(data, batch_size, model.cfg.vision.image_size, TextReducer("truncate", model.context_length),
                        train=False, threads=threads, device=device, rank=rank, world=world)
    feats, labels, names, error = [], [], {}, None
    for batch in tqdm(loader, desc="images", unit="batch", disable=not progress):
        feats.append(model.encode_image(batch["images"], normalize=True).float())
        for key, m in zip(batch["keys"], batch["meta"], strict=True):
            if "label" not in m:
                error = error or ValueError(f"evaluation sample {key!r} in {data!r} has no 'label' in its .json "
                                            f"({m}): zero-shot classification needs labelled samples")
                continue
            label = class_index(m["label"])
            if label is None:
                error = error or ValueError(f"evaluation sample {key!r} in {data!r} has label {m['label']!r} in its "
                                            ".json: a class index (0, 1, ...) is needed; a name goes in 'classname'")
                continue
            labels.append(label)
            if "classname" in m:
                names[label] = m["classname"]
    raise_any(error, world)
    img = torch.cat(feats) if feats else torch.empty(0, model.cfg.embed_dim, device=device)
    img = gather_rows(img, world)  # (N, E), every rank's in rank order
    y = gather_rows(torch.tensor(labels, dtype=torch.long, device=device), world)
    for part in gather_objects(names, world)[::-1]:  # (rank 0's names last: they win, as one rank reading all)
        names.update(part)
    if not y.numel():
        raise ValueError(f"no evaluation samples in {data!r}")
    classnames = classnames or meta.get("classnames")
    if not classnames and names:  # from the samples' own names: the labels that have one, in order (a label with no
        ids = sorted(names)  # sample in the set is no class here), the samples' labels renumbered to match
        unnamed = sorted(set(y.tolist()) - set(ids))
        if unnamed:
            raise ValueError(f"label {unnamed[0]} in {data!r} has no class name: no sample with it carries a "
                             f"'classname' (and neither --classnames nor a meta.json gives them)")
        classnames = [names[i] for i in ids]
        y = torch.searchsorted(torch.tensor(ids, device=y.device), y)
    classnames = classnames or []
    if int(y.max()) >= len(classnames) or int(y.min()) < 0:
        bad = int(y.max()) if int(y.max()) >= len(classnames) else int(y.min())
        raise ValueError(f"label {bad} in {data!r} has no class name: {len(classnames)} class names given "
                         f"(--classnames, meta.json or the samples' 'classname')")
    lo, hi = len(classnames) * rank // world, len(classnames) * (rank + 1) // world  # this rank's classes
    clf = gather_rows(text_classifier(model, classnames[lo:hi], templates, device, progress), world)
    logits = img @ clf.T  # (N, C)
    topk = logits.topk(min(5, len(classnames)), dim=1).indices
    return {
        "top1": (topk[:, 0] == y).float().mean().item(),
        "top5": (topk == y[:, None]).any(dim=1).float().mean().item(),
        "samples": int(y.numel()),
        "classes": len(classnames),
        "skipped": summed(loader.skipped, world),
    }


def recall_at_k(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, ks=RECALL_AT, chunk: int = 1024) -> dict:
    """img (N, E) and txt (M, E) normalised embeddings; owner (M,): the image index of each caption.
    Returns {"i2t_r1": ..., "t2i_r1": ..., ...}: the share of images (captions) whose own caption (image) ranks
    within the first K, ties broken at random in expectation (module docstring). Queries go `chunk` at a time:
    (chunk, N or M) scores in memory, not (N, M)."""
    img, txt, owner = img.float(), txt.float(), owner.to(img.device)
    n = img.shape[0]
    # per query: (wrong answers scoring above the best right one, wrong ones tied with it, right ones tied with it)
    ahead = {"i2t": [], "t2i": []}
    for i in range(0, txt.shape[0], chunk):
        s = txt[i : i + chunk] @ img.T  # (c, N)
        right = s.gather(1, owner[i : i + chunk, None])
        tied = (s == right).sum(1)
        ahead["t2i"].append(torch.stack([(s > right).sum(1), tied - 1, torch.ones_like(tied)], 1))  # one right image
    for i in range(0, n, chunk):
        s = img[i : i + chunk] @ txt.T  # (c, M)
        own = owner[None, :] == torch.arange(i, min(i + chunk, n), device=img.device)[:, None]
        best = s.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
        tied = s == best
        ahead["i2t"].append(torch.stack([((s > best) & ~own).sum(1), (tied & ~own).sum(1), (tied & own).sum(1)], 1))
    out = {}
    for d, parts in ahead.items():
        higher, same, mine = torch.cat(parts).float().unbind(1)
        for k in ks:  # 1 - P(the first k - higher of the tied ones in a random order are all wrong)
            slots, miss = (k - higher).clamp(min=0), torch.ones_like(higher)
            for j in range(k):
                miss = torch.where(j < slots, miss * ((same - j) / (same + mine - j)).clamp(min=0), miss)
            out[f"{d}_r{k}"] = (1 - miss).mean().item()
    return out


@torch.no_grad()
def retrieval(model: CLIP, data: str, batch_size=256, device="cpu", threads=2, progress: bool = False, rank: int = 0,
              world: int = 1) -> dict:
    """Image <-> text retrieval over every image and caption of `data` (module docstring): recall@1/5/10 both ways,
    their mean, and the counts. With world > 1 every rank (a collective) encodes its share of the images and their
    captions, and every rank returns the whole set's result."""
    device = torch.device(device)
    loader = DaliLoader(data, batch_size, model.cfg.vision.image_size, TextReducer("truncate", model.context_length),
                        train=False, threads=threads, device=device, rank=rank, world=world)
    from tqdm import tqdm

    feats, captions, owner, error = [], [], [], None
    for batch in tqdm(loader, desc="images", unit="batch", disable=not progress):
        feats.append(model.encode_image(batch["images"], normalize=True).float())
        for key, caption, m in zip(batch["keys"], batch["captions"], batch["meta"], strict=True):
            caps = m.get("captions", [caption])
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                error = error or ValueError(f"sample {key!r} in {data!r}: 'captions' in its .json must be a non-empty "
                                            f"list of non-empty strings, got {caps!r}")
                caps = [caption]
            owner += [owner[-1] + 1 if owner else 0] * len(caps)  # images numbered in read order
            captions += caps
    raise_any(error, world)
    img = torch.cat(feats) if feats else torch.empty(0, model.cfg.embed_dim, device=device)
    before = sum(gather_objects(img.shape[0], world)[:rank])  # the images of the ranks before this one
    owner = gather_rows(torch.tensor(owner, dtype=torch.long, device=device) + before, world)
    img = gather_rows(img, world)
    if not img.shape[0]:
        raise ValueError(f"no evaluation samples in {data!r}")
    txt = gather_rows(encode_captions(model, captions, device, batch_size, progress), world)
    res = recall_at_k(img, txt, owner)
    res["mean_recall"] = sum(res.values()) / len(res)
    return {**res, "images": img.shape[0], "captions": txt.shape[0], "skipped": summed(loader.skipped, world)}


def summary(task: str, data: str, res: dict) -> str:
    """One line for a result of zero_shot or retrieval."""
    skipped = res.get("skipped") or {}
    left = f"; {sum(skipped.values())} skipped: {', '.join(f'{k} {v}' for k, v in skipped.items())}" if skipped else ""
    if task == "retrieval":
        r = "  ".join(f"{k.replace('_r', ' R@')} {100 * res[k]:.2f}%" for k in res if k[:4] in ("i2t_", "t2i_"))
        return f"retrieval on {data}: {r}  ({res['images']} images, {res['captions']} captions{left})"
    return (f"zero-shot on {data}: top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  "
            f"({res['samples']} samples, {res['classes']} classes, chance {100 / res['classes']:.1f}%{left})")


def eval_sets(spec: str, task: str) -> list[tuple[str, str]]:
    """A `val_data` / `retrieval_data` value -> [(result key, shards)]. One set: key `task`. Several, separated by
    ';', each `name=shards` or just shards (named by its folder): keys `task:name`."""
    parts = [p.strip() for p in spec.split(";") if p.strip()]
    named = []
    for part in parts:
        name, eq, data = part.partition("=")
        if not eq or "/" in name:  # no name given (or an '=' inside a path): the folder names it
            name, data = Path(part.rstrip("/")).name, part
        named.append((name.strip(), data.strip()))
    if len(named) == 1 and "=" not in parts[0]:
        return [(task, named[0][1])]
    keys = [f"{task}:{name}" for name, _ in named]
    if len(set(keys)) < len(keys):
        raise ValueError(f"{task} sets {spec!r}: two have the same name; name them, name=shards;name2=shards2")
    return [(k, data) for k, (_, data) in zip(keys, named, strict=True)]


def evaluate_all(model: CLIP, val_data: str = "", retrieval_data: str = "", device="cpu", threads: int = 2,
                 say=print, rank: int = 0, world: int = 1) -> dict:
    """The trainer's evaluations: {"zeroshot": zero_shot(val_data), "retrieval": retrieval(retrieval_data)} (with
    several sets, a key per set: eval_sets), where data is given, in eval mode (the model's mode restored after);
    `say` gets a summary line of each. world > 1: every rank calls it and takes a share of the work (a collective)."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for key, data in eval_sets(val_data, "zeroshot"):
            out[key] = zero_shot(model, data, device=device, threads=threads, rank=rank, world=world)
            say(summary("zeroshot", data, out[key]))
        for key, data in eval_sets(retrieval_data, "retrieval"):
            out[key] = retrieval(model, data, device=device, threads=threads, rank=rank, world=world)
            say(summary("retrieval", data, out[key]))
    finally:
        model.train(was_training)
    return out


def scalars(results: dict) -> dict:
    """evaluate_all's result as flat {"zeroshot/top1": 0.97, "retrieval:coco/i2t_r1": ...} (numbers only), for logs."""
    return {f"{task}/{k}": v for task, res in results.items() for k, v in res.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model.pt written by clipfast.train, or its run folder; with "
                    "--open-clip, that model's open_clip state dict")
    ap.add_argument("--open-clip", default=None, metavar="NAME", help="the open_clip model name of --checkpoint (a "
                    "baseline evaluated the same way)")
    ap.add_argument("--data", required=True, help="held-out shards: class labels in .json (zeroshot) or captions "
                                                  "(retrieval)")
    ap.add_argument("--task", choices=("zeroshot", "retrieval"), default="zeroshot")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--classnames", default="", help="comma-separated, in label order; a file with one a line; or "
                    "imagenet")
    ap.add_argument("--templates", default="", help="'|'-separated prompts with {} for the class name; a file with "
                                                    "one a line; or openai, simple")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="DALI decoding threads")
    ap.add_argument("--out", default="", help="also write the result as JSON here")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = ap.parse_args(argv)
    try:
        classnames, templates = named_classnames(args.classnames), named_templates(args.templates)
    except ValueError as e:
        ap.error(str(e))
    try:
        model = load_model(args.checkpoint, args.device, open_clip_name=args.open_clip)
    except (FileNotFoundError, ValueError) as e:  # (the inputs' fault: said in a line, no traceback)
        ap.error(f"--checkpoint {args.checkpoint!r}: {e}")
    if args.task == "retrieval":
        res = retrieval(model, args.data, args.batch_size, args.device, args.threads, progress=not args.no_progress)
    else:
        res = zero_shot(model, args.data, args.batch_size, classnames, templates, args.device, args.threads,
                        progress=not args.no_progress)
    print(summary(args.task, args.data, res))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

"""Named zero-shot prompt sets, from open_clip's zero-shot metadata: one place for clipfast.evaluate's --classnames /
--templates and clipfast.data.make_shards' meta.json.

- templates "openai": the CLIP paper's 80 ImageNet prompts; "simple": the 7 of them that OpenAI's prompt-engineering
  notebook selected (an 11th of the text encoding);
- class names "imagenet": ImageNet-1k's 1000 human-readable names in sorted-wnid order (torchvision's label order).
"""
from __future__ import annotations

TEMPLATE_SETS = ("openai", "simple")


def template_set(name: str) -> list[str]:
    """The named set's templates, each with {} for the class name."""
    from open_clip import zero_shot_metadata as z

    sets = {"openai": z.OPENAI_IMAGENET_TEMPLATES, "simple": z.SIMPLE_IMAGENET_TEMPLATES}
    if name not in sets:
        raise KeyError(f"no template set {name!r}; named sets: {', '.join(TEMPLATE_SETS)}")
    return [t("{}") for t in sets[name]]  # open_clip's templates are lambdas


def imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def lines_of(path, what: str) -> list[str]:
    """The stripped, non-blank lines of a UTF-8 text file of class names or templates; ValueError naming `what` and
    the file where it is not UTF-8."""
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({e})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def template_problem(template: str) -> str | None:
    """Why `template` cannot take a class name (it needs exactly one {} and no other fields), or None. The fields are
    str.format's own ("{{}}" is a literal brace pair, no field: every class would get one prompt)."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        ok = fields == [""] and bool(template.format("x"))  # (a conversion or format spec a name cannot take)
    except (IndexError, KeyError, ValueError, TypeError):  # an unmatched brace, "{:d}", "{!x}", ...
        ok = False
    return None if ok else f"template {template!r} needs one {{}} for the class name"

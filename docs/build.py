"""Write the walkthroughs and their pictures from the code: `python -m docs.build`.

    python -m docs.build                      # docs/{sam,florence2,convmae}.md and docs/pictures/*.png
    python -m docs.build --check              # rebuild in memory; exit 1 listing what is stale
    python -m docs.build --checkpoint sam_vit_b.safetensors --checkpoint florence2_base.safetensors
                                              # also draw what trained weights show, in docs/pictures/trained/

The markdown must match byte for byte (links and shapes are computed, so any difference means the code
moved). Pictures of the small seeded runs are compared too, but a differing picture is only reported:
float rounding may differ in the last bit between CPUs and move a colour by one step.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import miniflorence
from docs import convmae as convmae_page
from docs import florence2 as florence2_page
from docs import sam as sam_page
from docs import trained
from docs.walk import DOCS, DocsError, Page
from miniflorence.model import image_grid

FAMILIES: dict[str, Callable[[], Page]] = {
    "sam": sam_page.build,
    "florence2": florence2_page.build,
    "convmae": convmae_page.build,
}


README_PICTURE = "convmae_block_mask.png"


def readme_section(steps: dict[str, int]) -> str:
    """The README's "Read the code" section (docs/readme_section.md, for pasting), with the pages' step counts."""
    base = miniflorence.CONFIGS["base"]
    rows, columns = image_grid(base, base.image_size, base.image_size)
    lines = [
        "## Read the code",
        "",
        "Three walkthroughs follow one real input from pixels to output, in the order the data flows: each step says "
        "what happens and why (paper section, equation, figure), links to the function that does it (file and "
        "line), and gives the tensor shapes at the released size. Every file of the family's package appears, in "
        "the order you meet it.",
        "",
        f"- [SAM](docs/sam.md) ({steps['sam']} steps): ViT-B at 1024 px, one photo with a click and a box, to masks.",
        f"- [Florence-2](docs/florence2.md) ({steps['florence2']} steps): Florence-2-base at 768 px, `<CAPTION>` and "
        "`<OD>` in one batch, to text and boxes.",
        f"- [ConvMAE](docs/convmae.md) ({steps['convmae']} steps): ConvMAE-B at 224 px with 75% masking, to the "
        "reconstruction loss; then FastConvMAE and ConvViT.",
        "",
        f"![ConvMAE's block-wise mask carried through the three stages](docs/pictures/{README_PICTURE})",
        "",
        "They are generated from the code, never written by hand: `python -m docs.build` runs each model (the "
        "full-size configurations on PyTorch's meta device, which gives shapes without computing anything; seeded "
        "small models for the pictures), records the shapes with hooks, finds every linked function with `inspect`, "
        "and writes `docs/`. `tests/test_docs.py` rebuilds them and fails when a shape changed or a function moved "
        "(`python -m docs.build --check` says which file is stale).",
        "",
        "Some things only trained weights show. `python -m docs.build --checkpoint sam_vit_b.safetensors "
        "--checkpoint florence2_base.safetensors` (converted files or run folders) also draws, into "
        "`docs/pictures/trained/`, SAM's token-to-image attention of the clicked point (every tokens → image "
        "attention of the two-way transformer, per head) and Florence-2's cross-attention of each word of a "
        f"generated caption over the {rows}x{columns} image grid. What to look for with the released weights: "
        "attention gathered on the clicked object and on the object each noun names, where a random model's maps are "
        "scattered. (Drawn on seeded test checkpoints in CI; the released weights are not part of the repository.)",
    ]
    return "\n".join(lines) + "\n"


def render(families: list[str] | None = None) -> dict[str, bytes]:
    """Every generated file, relative to docs/ ("sam.md", "pictures/sam_rel_pos.png", ...) -> its bytes."""
    files: dict[str, bytes] = {}
    steps: dict[str, int] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the small runs are tiny; one thread is faster on a shared CPU and deterministic
    try:
        for name in families or list(FAMILIES):
            try:
                page = FAMILIES[name]()
            except (AttributeError, TypeError, KeyError, IndexError) as e:  # the model code changed under the page
                raise DocsError(f"docs/{name}.py no longer matches the model code: {type(e).__name__}: {e}; "
                                f"update the walkthrough's run in docs/{name}.py") from e
            files[f"{page.name}.md"] = page.markdown().encode("utf-8")
            steps[page.name] = page.steps
            for picture, data in sorted(page.pictures.items()):
                files[f"pictures/{picture}"] = data
    finally:
        torch.set_num_threads(threads)
    if set(steps) == set(FAMILIES):
        files["readme_section.md"] = readme_section(steps).encode("utf-8")
    return files


def compare(files: dict[str, bytes], folder: Path, families: list[str]) -> tuple[list[str], list[str]]:
    """(stale: markdown that differs or a missing/extra picture, notes: pictures whose bytes differ)."""
    stale, notes = [], []
    for rel, data in sorted(files.items()):
        path = folder / rel
        if not path.exists():
            stale.append(f"{rel}: missing (run python -m docs.build)")
        elif path.read_bytes() != data:
            (stale if rel.endswith(".md") else notes).append(f"{rel}: differs from the code")
    prefixes = tuple(f"{f}_" for f in families)
    for path in sorted((folder / "pictures").glob("*.png")):
        rel = f"pictures/{path.name}"
        if path.name.startswith(prefixes) and rel not in files:
            stale.append(f"{rel}: no longer drawn (delete it)")
    return stale, notes


def write(files: dict[str, bytes], folder: Path) -> None:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docs.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                        help="a converted SAM or Florence-2 .safetensors (or a run folder): draw its attention")
    parser.add_argument("--tokenizer", default=str(trained.TOKENIZER), metavar="DIR",
                        help="the Florence-2 tokenizer folder for --checkpoint (default: the bundled one)")
    parser.add_argument("--out", default=str(DOCS), metavar="DIR", help="where to write (default: docs/)")
    parser.add_argument("--only", choices=list(FAMILIES), action="append", help="build only these walkthroughs")
    args = parser.parse_args(argv)
    families = args.only or list(FAMILIES)
    out = Path(args.out)
    start = time.perf_counter()
    try:
        for path in args.checkpoint:  # a wrong file is reported before the walkthroughs are built
            trained.family_of(trained.weights_file(path))
        files = render(families)
        if args.check:
            stale, notes = compare(files, out, families)
            for line in notes:
                print(f"note: {line} (pictures may differ in rounding between CPUs)")
            for line in stale:
                print(f"stale: {line}", file=sys.stderr)
            if stale:
                print("the walkthroughs are stale: run python -m docs.build and commit docs/", file=sys.stderr)
                return 1
            print(f"docs are up to date ({len(files)} files, {time.perf_counter() - start:.1f} s)")
            return 0
        write(files, out)
        for path in args.checkpoint:
            for rel, data in trained.draw_checkpoint(path, args.tokenizer).items():
                write({rel: data}, out)
                print(f"wrote {out / rel}")
    except (DocsError, trained.CheckpointInputError) as e:
        print(f"docs.build: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} files under {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The generated walkthroughs (docs/*.md): current, every link on its `def` line, stale ones caught.

`python -m docs.build` writes them from the code; these tests rebuild them and compare the markdown byte
for byte. The pictures are checked for presence and size only: they come from small real float runs, whose
last bits (hence a colour step here and there) may differ between CPUs.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import ROOT
from PIL import Image

if str(ROOT) not in sys.path:  # `docs` is the repository's folder, not an installed package
    sys.path.insert(0, str(ROOT))

import minisam
from docs import build, trained
from docs.walk import DocsError, link, resolve
from miniflorence import Florence2
from miniflorence import tiny_config as florence_tiny
from minisam import Sam
from minisam import tiny_config as sam_tiny
from minivision.checkpoint import save_converted

DOCS = ROOT / "docs"
PAGES = ("sam.md", "florence2.md", "convmae.md")
# [`Qual.name`](../package/file.py#L123)
ANCHORED = re.compile(r"\[`([A-Za-z_][\w.]*)`\]\(\.\./([\w/]+\.py)#L(\d+)\)")
PLAIN = re.compile(r"\]\((\.\./[^)#]+)\)")
PICTURE = re.compile(r"!\[[^\]]*\]\((pictures/[^)]+)\)")


@pytest.fixture(scope="module")
def rebuilt() -> dict[str, bytes]:
    return build.render()


def link_problems(markdown: str, docs_dir: Path) -> list[str]:
    """Every anchored link must point at an existing file whose line is the `def`/`class` of the name it shows."""
    problems = []
    for name, rel, line in ANCHORED.findall(markdown):
        path = (docs_dir / ".." / rel).resolve()
        if not path.is_file():
            problems.append(f"{rel}: no such file")
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        last = name.rsplit(".", 1)[-1]
        n = int(line)
        if not (1 <= n <= len(lines) and re.match(rf"\s*(async\s+)?(def|class)\s+{re.escape(last)}\b", lines[n - 1])):
            problems.append(f"{rel}#L{line}: is not the def/class line of {name}")
    for rel in PLAIN.findall(markdown):
        if not (docs_dir / rel).resolve().exists():
            problems.append(f"{rel}: no such file")
    return problems


def test_committed_markdown_is_what_the_code_gives(rebuilt: dict[str, bytes]) -> None:
    stale, _ = build.compare(rebuilt, DOCS, list(build.FAMILIES))
    assert not stale, "docs are stale; run python -m docs.build:\n" + "\n".join(stale)
    for page in (*PAGES, "readme_section.md"):
        assert (DOCS / page).read_bytes() == rebuilt[page], page


def test_pictures_are_drawn_and_referenced(rebuilt: dict[str, bytes]) -> None:
    for page in PAGES:
        for rel in PICTURE.findall((DOCS / page).read_text(encoding="utf-8")):
            assert rel in rebuilt, f"{page} shows {rel}, which the build does not draw"
            committed = Image.open(DOCS / rel)
            assert committed.size == Image.open(io.BytesIO(rebuilt[rel])).size, rel


def test_every_link_is_on_the_def_line_of_its_name() -> None:
    for page in PAGES:
        text = (DOCS / page).read_text(encoding="utf-8")
        assert len(ANCHORED.findall(text)) > 20, page
        assert link_problems(text, DOCS) == [], page


def test_every_link_names_the_object_at_that_line() -> None:
    """The shown name resolves in the module of the linked file, and inspect puts it on the linked line."""
    for page in PAGES:
        for name, rel, line in ANCHORED.findall((DOCS / page).read_text(encoding="utf-8")):
            module = rel[: -len(".py")].replace("/", ".").removesuffix(".__init__")
            obj = inspect.unwrap(resolve(f"{module}:{name}")[0])
            obj = getattr(obj, "__func__", obj)
            assert Path(inspect.getsourcefile(obj)).resolve() == (ROOT / rel).resolve(), name
            source, first = inspect.getsourcelines(obj)
            assert first <= int(line) < first + len(source), f"{name} is not at {rel}#L{line}"


def test_walkthroughs_cover_every_file_of_the_model_packages() -> None:
    for page, package in zip(PAGES, ("minisam", "miniflorence", "convmae"), strict=True):
        text = (DOCS / page).read_text(encoding="utf-8")
        for path in sorted((ROOT / package).glob("*.py")):
            assert f"(../{package}/{path.name})" in text, f"{page} does not mention {package}/{path.name}"


def test_a_moved_function_breaks_its_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "movedpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("import math\n\n\ndef area(r: float) -> float:\n    return math.pi * r * r\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("docs.walk.ROOT", tmp_path)
    text = f"see {link('movedpkg.mod:area')}"
    assert "(../movedpkg/mod.py#L4)" in text
    (tmp_path / "docs").mkdir()
    assert link_problems(text, tmp_path / "docs") == []
    source = (package / "mod.py").read_text()
    (package / "mod.py").write_text(source.replace("import math\n", "import math\n\nTAU = 2 * math.pi\n"))
    assert link_problems(text, tmp_path / "docs") == ["movedpkg/mod.py#L4: is not the def/class line of area"]


def test_a_removed_function_stops_the_build_naming_it() -> None:
    with pytest.raises(DocsError, match="minisam.sam has no Sam.no_such_stage"):
        link("minisam.sam:Sam.no_such_stage")


def test_a_changed_shape_makes_the_markdown_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    wider = dataclasses.replace(minisam.CONFIGS["vit_b"], encoder_embed_dim=1152)
    monkeypatch.setitem(minisam.CONFIGS, "vit_b", wider)
    files = build.render(["sam"])
    stale, _ = build.compare(files, DOCS, ["sam"])
    assert stale == ["sam.md: differs from the code"]
    assert "(1, 64, 64, 1152)" in files["sam.md"].decode()


def seeded_sam_checkpoint(path: Path) -> None:
    config = sam_tiny()
    torch.manual_seed(0)
    save_converted(path, Sam(config).state_dict(), "sam", config.to_dict())


def seeded_florence2_checkpoint(path: Path) -> None:
    config = florence_tiny(image_size=96)  # a 3x3 image-token grid: the picture's mechanics, quickly
    torch.manual_seed(0)
    state = Florence2(config).state_dict()
    save_converted(path, {k: v for k, v in state.items() if "embed_tokens" not in k and "lm_head" not in k},
                   "florence2", config.to_dict())


def test_checkpoint_draws_the_attention_pictures(tmp_path: Path) -> None:
    seeded_sam_checkpoint(tmp_path / "sam.safetensors")
    seeded_florence2_checkpoint(tmp_path / "florence2.safetensors")
    sam = trained.draw_checkpoint(tmp_path / "sam.safetensors")
    florence = trained.draw_checkpoint(tmp_path / "florence2.safetensors")
    assert list(sam) == ["pictures/trained/sam_token_to_image.png"]
    assert list(florence) == ["pictures/trained/florence2_cross_attention.png"]
    sam_picture = Image.open(io.BytesIO(sam["pictures/trained/sam_token_to_image.png"]))
    config = sam_tiny()
    # one row per tokens -> image attention, one tile per head
    assert sam_picture.width >= config.decoder_num_heads * trained.TILE
    assert sam_picture.height >= (config.decoder_depth + 1) * trained.TILE
    assert Image.open(io.BytesIO(florence["pictures/trained/florence2_cross_attention.png"])).width > 0


def test_checkpoint_of_another_kind_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.safetensors"
    bad.write_text("not a checkpoint")
    assert build.main(["--checkpoint", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("docs.build: --checkpoint") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_check_mode_exits_zero_when_current_and_one_when_stale(tmp_path: Path) -> None:
    assert build.main(["--check", "--only", "convmae"]) == 0
    assert build.main(["--out", str(tmp_path), "--only", "convmae"]) == 0
    (tmp_path / "convmae.md").write_text("edited by hand\n")
    assert build.main(["--check", "--only", "convmae", "--out", str(tmp_path)]) == 1

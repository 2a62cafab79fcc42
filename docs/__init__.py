"""The walkthroughs `docs/sam.md`, `docs/florence2.md`, `docs/convmae.md`, generated from the code.

`python -m docs.build` runs each model (full-size configurations on the meta device for the shapes,
small seeded models for the pictures), finds every function it links to with `inspect`, and writes
the markdown and `docs/pictures/`. `python -m docs.build --check` says what differs from the files
in the repository; `--checkpoint PATH` also draws what trained weights show.
"""

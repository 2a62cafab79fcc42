"""Drawing a Florence-2 answer on its image: boxes, OCR quads and polygons, each labelled.

`python -m miniflorence IMAGE --out pic.png` writes this picture; the coordinates are those of the
official post-processing (`Processor.post_process`), in the original image's pixels.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

COLORS = ("red", "lime", "blue", "orange", "magenta", "cyan", "yellow", "white")


def draw_results(image: Image.Image, answer: dict | str) -> Image.Image:
    """The image with every box, OCR quad and polygon of a post-processed answer drawn and labelled.

    Args:
        image: the original image (coordinates are in its pixels).
        answer: the value under the task key, e.g. {"bboxes": [[x1, y1, x2, y2]], "labels": ["car"]};
            plain-text answers draw nothing.
    """
    out = image.convert("RGB")
    if not isinstance(answer, dict):
        return out
    draw = ImageDraw.Draw(out)

    def label(i: int, xy: tuple[float, float], text: str) -> None:
        if text:
            draw.text((xy[0] + 2, xy[1] + 1), str(text), fill=COLORS[i % len(COLORS)])

    box_labels = answer.get("labels", answer.get("bboxes_labels", []))
    for i, box in enumerate(answer.get("bboxes", [])):
        x1, y1, x2, y2 = box
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=COLORS[i % len(COLORS)], width=2)
        label(i, (x1, y1), box_labels[i] if i < len(box_labels) else "")
    for i, quad in enumerate(answer.get("quad_boxes", [])):
        points = [(quad[k], quad[k + 1]) for k in range(0, 8, 2)]
        draw.polygon(points, outline=COLORS[i % len(COLORS)], width=2)
        label(i, points[0], answer.get("labels", [""] * (i + 1))[i])
    poly_labels = answer.get("labels", answer.get("polygons_labels", []))
    for i, polygons in enumerate(answer.get("polygons", [])):
        for flat in polygons:  # one object may have several polygons, each [x0, y0, x1, y1, ...]
            points = [(flat[k], flat[k + 1]) for k in range(0, len(flat) - 1, 2)]
            if len(points) >= 2:
                draw.polygon(points, outline=COLORS[i % len(COLORS)], width=2)
                label(i, points[0], poly_labels[i] if i < len(poly_labels) else "")
    return out

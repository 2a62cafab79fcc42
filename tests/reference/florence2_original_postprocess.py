"""Make tests/fixtures/florence2/original_postprocess.json.gz with Microsoft's original
Florence-2 post-processing (`processing_florence2.py` from the microsoft/Florence-2-*
model repositories, remote code), which transformers' native port changed in small ways.

    python tests/reference/florence2_original_postprocess.py PATH/TO/processing_florence2.py

The file is loaded from the given path (it is not part of this repository); it imports
transformers (any 4.x or 5.x with BartTokenizer). Only `Florence2PostProcesser` and
`Florence2Processor.post_process_generation` are used, on text (no token ids, no scores), so
no tokenizer or image processor is built.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

from test_florence_processor import GENERATED, random_generation

# One task per output kind (the original processor's tasks_answer_post_processing_type).
TASK_KINDS = {
    "<CAPTION>": "pure_text",
    "<OCR_WITH_REGION>": "ocr",
    "<OD>": "description_with_bboxes",
    "<CAPTION_TO_PHRASE_GROUNDING>": "phrase_grounding",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "polygons",
    "<OPEN_VOCABULARY_DETECTION>": "description_with_bboxes_or_polygons",
    "<REGION_PROPOSAL>": "bboxes",
}
OUT = TESTS / "fixtures" / "florence2" / "original_postprocess.json.gz"


def main(source: str) -> None:
    spec = importlib.util.spec_from_file_location("original_processing_florence2", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # post_process_generation only reads these two attributes of the processor.
    processor = SimpleNamespace(tasks_answer_post_processing_type=TASK_KINDS,
                                post_processor=module.Florence2PostProcesser(tokenizer=None))
    rng = random.Random(0)
    cases = [(text, size) for text in GENERATED for size in [(640, 480), (333, 517)]]
    cases += [(random_generation(rng), rng.choice([(640, 480), (1000, 1000), (4032, 3024)])) for _ in range(150)]
    records = []
    for text, size in cases:
        results = {task: module.Florence2Processor.post_process_generation(
            processor, text=text, task=task, image_size=size)[task] for task in TASK_KINDS}
        records.append({"text": text, "image_size": list(size), "results": results})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {"source": "microsoft/Florence-2-* processing_florence2.py (remote code)", "tasks": TASK_KINDS}
    with gzip.open(OUT, "wt", encoding="utf-8") as f:
        json.dump({"meta": meta, "cases": records}, f)
    print(f"wrote {len(records)} cases to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])

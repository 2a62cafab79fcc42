"""Florence-2's processor: image preprocessing, task prompts, and the way back to results.

Mirrors `Florence2Processor` in transformers' `models/florence2/processing_florence2.py`
and its image processor (`CLIPImageProcessor` configured by Florence-2's
`preprocessor_config.json`), which port Microsoft's `processing_florence2.py`.
Florence-2 (Xiao et al. 2023, sec. 3) turns every task into a text prompt: the task token
(`<OD>`) is replaced by a fixed question, and the image is a 768x768 square.

Preprocessing, step by step (transformers' PIL path, which gives the same bits):
  1. to RGB; an alpha channel (RGBA, LA, palette with transparency) is composited onto white
     (a path is read by `images.read_image`, which also scales 16-bit and float images instead
     of clipping them and applies the EXIF orientation; a PIL image is converted as transformers
     does, bit for bit, so pass 16-bit images through `read_image` first);
  2. resize straight to 768x768 with PIL bicubic, on the uint8 image (no aspect ratio, no crop);
  3. x / 255 in float64, then float32;
  4. (x - mean) / std in float32, ImageNet mean and std.

Where Microsoft's original processor (run with transformers 4.x) differs: step 1 there is a
plain `convert("RGB")`, which drops alpha instead of compositing onto white, and the text of
`{input}` tasks is not stripped. Post-processing differences: see postprocess.py.
"""

from __future__ import annotations

import difflib
import os
import re

import numpy as np
import torch
from PIL import Image

from .config import Florence2Config
from .images import read_image, to_rgb
from .postprocess import TASK_OUTPUT_KINDS, post_process
from .tokenizer import Tokenizer

ImageInput = str | os.PathLike | Image.Image | np.ndarray
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 768

# Task token -> the prompt the model was trained with. `{input}` marks the tasks that need text
# (a phrase, a caption, or a region written as four `<loc_k>` tokens).
TASK_PROMPTS: dict[str, str] = {
    "<OCR>": "What is the text in the image?",
    "<OCR_WITH_REGION>": "What is the text in the image, with regions?",
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<OD>": "Locate the objects with category name in the image.",
    "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
    "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
    "<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "Locate {input} in the image with mask",
    "<REGION_TO_SEGMENTATION>": "What is the polygon mask of region {input}",
    "<OPEN_VOCABULARY_DETECTION>": "Locate {input} in the image.",
    "<REGION_TO_CATEGORY>": "What is the region {input}?",
    "<REGION_TO_DESCRIPTION>": "What does the region {input} describe?",
    "<REGION_TO_OCR>": "What text is in the region {input}?",
}
assert TASK_PROMPTS.keys() == TASK_OUTPUT_KINDS.keys()


def task_prompt(task: str, text: str | None = None) -> str:
    """The prompt for `task`, with `text` (stripped, as transformers does) in place of `{input}`.

    A task without `{input}` refuses text, as the official processor does; a task with it
    needs non-empty text (the official one would silently prompt with nothing)."""
    if not isinstance(task, str) or task not in TASK_PROMPTS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_PROMPTS)}")
    template = TASK_PROMPTS[task]
    if "{input}" not in template:
        if text:
            raise ValueError(f"task {task} takes no text input, got {text!r}")
        return template
    if text is None or not isinstance(text, str) or not text.strip():
        raise ValueError(f"task {task} needs a non-empty text input ({template!r}), got {text!r}")
    return template.format(input=text.strip())


# A task token of a fine-tune: `<` + a name without spaces or angle brackets + `>` (e.g. "<DocVQA>").
CUSTOM_TASK = re.compile(r"<[^<>\s]+>")


def check_task(task: str) -> None:
    """Refuse a task that is neither official nor a well-formed custom token, or a near-miss of an
    official one (`<CAPTON>`, `<od>`): a typo would otherwise run as an unknown prompt."""
    if not isinstance(task, str) or not task.strip():
        raise ValueError(f"the task is empty; give a task token such as {', '.join(list(TASK_PROMPTS)[:3])}")
    if task in TASK_PROMPTS:
        return
    if not CUSTOM_TASK.fullmatch(task):
        raise ValueError(f"task {task!r} is not a task token: expected one of {', '.join(TASK_PROMPTS)}, "
                         "or a fine-tune's own token written <Name> (e.g. <DocVQA>)")
    near = [t for t in TASK_PROMPTS if t.lower() == task.lower()]
    near = near or difflib.get_close_matches(task, list(TASK_PROMPTS), n=1, cutoff=0.85)
    if near:
        raise ValueError(f"unknown task {task!r}: did you mean {near[0]}?")


def any_task_prompt(task: str, text: str | None = None) -> str:
    """The prompt for an official task (`task_prompt`), or for a fine-tune's own task token the token
    followed by the text as it is ("<DocVQA>" + "What is the total?"), as `train.florence2` builds it."""
    check_task(task)
    if task in TASK_PROMPTS:
        return task_prompt(task, text)
    if text is not None and not isinstance(text, str):
        raise ValueError(f"the text of task {task} must be a string, got {type(text).__name__}")
    return task + (text or "")


def check_tokenizer(tokenizer: Tokenizer, config: Florence2Config, where: str = "the tokenizer") -> None:
    """Refuse a tokenizer that cannot drive a model of `config`: ids past the model's token table
    (an IndexError inside the model otherwise) or other ids for `<s>`, `<pad>`, `</s>`.

    A tokenizer with fewer tokens than the table is accepted (`train.florence2` allows it); ids it
    lacks cannot be decoded if the model generates them."""
    size = max(tokenizer.decoder) + 1
    if size > config.vocab_size:
        raise ValueError(f"{where} has ids up to {size - 1}, but the model's token table has {config.vocab_size} rows: "
                         "use the tokenizer the model was trained or converted with")
    ours = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
    theirs = (config.bos_token_id, config.pad_token_id, config.eos_token_id)
    if ours != theirs:
        raise ValueError(f"{where} has <s>, <pad>, </s> at ids {ours}, the model expects {theirs}: "
                         "use the tokenizer the model was trained or converted with")


def preprocess_image(
    image: Image.Image | np.ndarray,
    size: int = IMAGE_SIZE,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """One image -> (3, size, size) float32, normalised (the four steps in the file header)."""
    resized = to_rgb(image).resize((size, size), resample=Image.BICUBIC)
    x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    x = (x.double() * (1 / 255)).float()  # rescale in float64, store float32, as transformers
    mean_ = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_ = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_) / std_  # (3, H, W)


class Processor:
    """Turns (task, image, text) into model inputs, and generated text into results.

    Prompts outside the task table (a fine-tuning prompt such as "<DocVQA>" + question) go
    through `processor.tokenizer(prompts)` and `processor.preprocess(images)` directly
    (`any_task_prompt` builds them the way `train.florence2` does).

    Example:
        processor = Processor(Tokenizer.from_dir("florence2_tokenizer/"))
        inputs = processor("<OD>", image)  # pixel_values, input_ids, attention_mask
        ids = model.generate(**inputs)  # (1, S), starting </s><s>
        processor.post_process("<OD>", ids[0], image.size)  # {"<OD>": {"bboxes": ..., "labels": ...}}

    Args:
        tokenizer: the Florence-2 `Tokenizer`.
        image_size: the square side images are resized to (768 for the released models).
    """

    def __init__(self, tokenizer: Tokenizer, image_size: int = IMAGE_SIZE) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"Processor needs a miniflorence Tokenizer, got {type(tokenizer).__name__}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.tokenizer = tokenizer
        self.image_size = image_size

    def preprocess(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """Image(s) -> pixel_values (B, 3, S, S) float32. A path is read with `read_image`."""
        images = images if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("no images given")
        pixels = []
        for image in images:
            if isinstance(image, (str, os.PathLike)):
                image = read_image(image)
            elif isinstance(image, Image.Image) and (image.width < 1 or image.height < 1):
                raise ValueError(f"the image is empty ({image.width}x{image.height} pixels)")
            pixels.append(preprocess_image(image, self.image_size))
        return torch.stack(pixels)  # (B, 3, S, S)

    def __call__(
        self,
        task: str | list[str],
        image: ImageInput | list[ImageInput],
        text: str | None | list[str | None] = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs for one or several (task, image, text) triples.

        Args:
            task: a task token from TASK_PROMPTS, or one per image.
            image: a path (read by `read_image`), a PIL image (converted to RGB as transformers
                does) or a uint8 (H, W, 3) array, or a list of them.
            text: the `{input}` of tasks that take one (a phrase, a caption, `<loc_..>` x4), or
                one per image.

        Returns:
            {"pixel_values": (B, 3, S, S) float32, "input_ids": (B, T) int64 `<s> prompt </s>`
            right-padded with `<pad>` (id 1), "attention_mask": (B, T) int64, 0 on padding}.
        """
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        B = len(images)
        tasks = list(task) if isinstance(task, (list, tuple)) else [task] * B
        texts = list(text) if isinstance(text, (list, tuple)) else [text] * B
        if not (len(tasks) == len(texts) == B):
            raise ValueError(f"got {B} images, {len(tasks)} tasks and {len(texts)} texts")
        prompts = [task_prompt(t, x) for t, x in zip(tasks, texts)]
        return {"pixel_values": self.preprocess(images), **self.tokenizer(prompts)}

    def post_process(
        self,
        task: str,
        generated: str | list[int] | torch.Tensor,
        image_size: tuple[float, float],
        original: bool = False,
    ) -> dict:
        """The official result dict `{task: answer}` for one generation.

        Args:
            task: the task token the prompt was made from.
            generated: the decoded text with special tokens kept (`batch_decode(ids,
                skip_special_tokens=False)`, e.g. "</s><s>car<loc_52>...</s>"), or the ids.
            image_size: (width, height) of the original image.
            original: Microsoft's original post-processing (float coordinates, ...) instead
                of transformers' (integer coordinates); see postprocess.py.
        """
        if isinstance(generated, torch.Tensor) and generated.dim() != 1:
            raise ValueError(f"post_process takes one sequence of ids, got shape {tuple(generated.shape)}")
        if isinstance(generated, (list, tuple, torch.Tensor)):
            generated = self.tokenizer.decode(generated, skip_special_tokens=False)
        return post_process(task, generated, image_size, original)

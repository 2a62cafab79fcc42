"""Fine-tune Florence-2 on (image, question, answer) data: `python -m train.florence2 --data train.jsonl`.

The recipe of the public DocVQA fine-tuning tutorial for Florence-2-base-ft (the anchor in
REFERENCE.md: prompt "<DocVQA>" + question, AdamW at lr 1e-6 with a linear schedule, vision
tower frozen, batch 6, Levenshtein similarity 0 -> 57 after 7 epochs), with one bug fixed:
the tutorial computes the loss on the padded label positions too; here they are ignored, so a
batch's loss does not depend on how long its other answers are.

- Data: a JSONL of `{image, question, answer}` or `{image, prefix, suffix}` (any task, e.g.
  `<OD>` with `<loc_*>` tokens); every line and its image are checked before training (the image
  decoded once), and bad lines are skipped and counted (`train.florence2_data`).
- Loss: teacher-forced cross-entropy over the answer tokens `<s> answer </s>`, summed over the
  real tokens of the whole batch (all ranks) and divided by their number.
- `--freeze-vision` (default) keeps the DaViT tower fixed (and in eval mode: no drop path);
  its parameters are not given to the optimizer, so they stay bit-identical.
- Evaluation each epoch: beam-3 generation, then Levenshtein similarity (the tutorial's
  number), ANLS (threshold 0.5) and exact match (`train.levenshtein`); the best model by ANLS is
  written as a converted `.safetensors` that `miniflorence.load_florence2` reads.
- Detection fine-tuning: JSONL lines `{image, boxes, labels}` become `<OD>` targets in location
  tokens (`train.florence2_data`, `train.detection.od_target`); the evaluation decodes the
  generated boxes with the processor's post-processing (`decode_od`) and reports COCO mAP@0.5
  (`map50`) and mAP@[.5:.95] (`map`) per epoch; the best model is then the one of highest mAP@0.5.
- LoRA (`--lora-rank R`; Hu et al., 2021, `train.lora`): adapters on the language model's
  attention q and v by default (the LoRA paper's choice and the public Florence-2 LoRA recipe's
  `target_modules`), the vision tower too with `--lora-targets florence2_all`; only the adapters
  (and `--train-also`) train, the base weights stay bit-identical; best.safetensors has them
  merged, best_lora.safetensors holds the adapters and, whole, the `--train-also` tensors (with
  the base checkpoint it gives best.safetensors again: `python -m train.lora apply`).
- `last.pt` (model, optimizer, scheduler, step, RNG) for `--resume`, a NaN/inf guard, tqdm,
  `curves.png`, `metrics.jsonl`; `torchrun --nproc_per_node=N -m train.florence2 ...` runs DDP.
  A new run into a folder holding another's checkpoints needs `--overwrite`; `--resume` refuses
  settings that change the run (`train.run_folder.start_run`).
- The run folder holds `best.safetensors` (best by ANLS, or mAP@0.5) and `last.safetensors`, the
  converted files `miniflorence.load_florence2`, `python -m miniflorence` and `--checkpoint` of
  another run read (as does the folder itself). The start: `--checkpoint`, or random weights of
  `--model` only when asked for with `--from-scratch`.

Legend: B batch, T prompt tokens, t answer tokens, V vocabulary, S image side.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import miniflorence
from miniflorence.model import TIED_KEYS
from miniflorence.postprocess import strip_sequence_tokens
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR
from minivision.checkpoint import resolve_weights, save_converted
from train import distributed, loop, report, run_folder, script
from train.detection import collapse_inverted, decode_od, mean_average_precision
from train.florence2_data import DocDataset, collate
from train.florence2_sources import load_data
from train.levenshtein import anls, exact_match, similarity
from train.lora import add_lora, merged_state_dict, save_lora
from train.settings import TrainSettings, read_config

# The real Florence-2 tokenizer files, package data of miniflorence (MIT; miniflorence/assets/ATTRIBUTION.md).
REAL_TOKENIZER = DEFAULT_TOKENIZER_DIR

EXAMPLES = """
  python -m weights_convert florence2 Florence-2-base-ft/ florence2_base_ft.safetensors   # the official weights, once
  python -m train.florence2 --data docvqa_train.jsonl --checkpoint florence2_base_ft.safetensors --out runs/docvqa
  python -m train.florence2 --out runs/docvqa --resume                     # continue an interrupted run
  python -m train.florence2 --data more.jsonl --checkpoint runs/docvqa --out runs/docvqa2   # from a run (its best)
  python -m train.florence2 --data boxes.jsonl --checkpoint florence2_base_ft.safetensors --lora-rank 8 --out runs/od
  python -m miniflorence runs/docvqa tokenizer/ page.png --task "<DocVQA>" --text "What is the total?"
  torchrun --nproc_per_node=2 -m train.florence2 --data docvqa_train.jsonl --checkpoint runs/docvqa --out runs/ddp
  python -m train.florence2 --data docvqa_train.jsonl --from-scratch --model tiny --lr 1e-3 --out runs/tiny
"""


@dataclass
class Settings(TrainSettings):
    """Fine-tune Florence-2 on a JSONL of image questions and answers.

    --data (and --val-data): a JSONL file, one JSON object per line, either
      {"image": "page.png", "question": "What is the total?", "answer": "12.50"} (answer: a string or a list)
      or {"image": "street.jpg", "prefix": "<OD>", "suffix": "car<loc_52><loc_330><loc_932><loc_771>"};
      or, for detection, {"image": "street.jpg", "boxes": [[x1, y1, x2, y2], ...], "labels": ["car", ...]}
      (pixels; written as the <OD> target in location tokens, 1,000 bins per axis as the official
      processor quantises; an image with no boxes is a negative example whose target is the empty answer);
    image paths are relative to the JSONL's folder (or absolute). Every line and its image are
    checked before training (the image decoded once); bad lines are skipped and counted.
    Also: a COCO instances JSON (detection: boxes + category names as <OD> targets; --images,
    --categories), or parquet (a file, glob or Hugging Face dataset folder, --split) with the DocVQA
    columns image, question, answers (a list) or image, prefix, suffix (--columns renames them).

    Recipes and where they come from:
      detection lines: the <OD> task of Florence-2 (Xiao et al., 2023, section 4: boxes as location
        tokens); evaluation decodes the generated boxes as the processor's post-processing does and
        reports COCO mAP@0.5 and mAP@[.5:.95] (Lin et al., 2014) each epoch.
      --lora-rank R: LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
        section 4.1 and 7.1: adapting q and v); the default targets are the language model's
        attention q_proj/v_proj, as the public Florence-2 LoRA fine-tuning recipe (peft
        target_modules q_proj, v_proj); florence2_vision / florence2_all add the DaViT tower's
        qkv/proj. Only the adapters (and --train-also) train; best.safetensors has them merged,
        best_lora.safetensors holds the adapters and the --train-also tensors
        (python -m train.lora apply BASE LORA OUT).
    """

    data: str = ""  # training JSONL, COCO instances JSON (<OD>), or parquet file/glob/dataset folder
    val_data: str = ""  # evaluation data of the same kinds; "": hold out --val-fraction of the training examples
    images: str = ""  # COCO --data: the folder its file_names are relative to; "": beside the JSON
    categories: str = ""  # COCO: comma-separated category names to detect; "": all
    split: str = ""  # parquet dataset folder: the split of --data ("": train, or the only one)
    val_split: str = ""  # parquet dataset folder: the split of --val-data ("": as --split)
    columns: str = ""  # parquet: ROLE=COLUMN overrides of image, question, answers (DocVQA), prefix, suffix
    val_fraction: float = 0.1  # the share of training examples held out when there is no --val-data (seeded)
    out: str = "runs/florence2"  # the run folder: settings.json, metrics.jsonl, last.pt, best/last.safetensors
    tokenizer: str = str(REAL_TOKENIZER)  # a folder Tokenizer.from_dir reads; by default the real one (in miniflorence)
    model: str = "tiny"  # built with --from-scratch: "tiny", a miniflorence.CONFIGS name, or a .json of config fields
    image_size: int = 0  # the input side (a multiple of 32); 0: the config's (768 for the released models)
    task_prefix: str = "<DocVQA>"  # put before each question (not before `prefix` records)
    max_answer_tokens: int = 64  # longer answers are skipped and counted
    epochs: int = 7  # passes over the training data (the tutorial's 7)
    batch_size: int = 6  # samples per process and micro-batch (the tutorial's 6)
    lr: float = 1e-6  # peak learning rate (the tutorial's)
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0
    schedule: str = "linear"  # linear, cosine, constant
    freeze_vision: bool = True  # keep the DaViT vision tower fixed (and in eval mode)
    lora_rank: int = 0  # LoRA (Hu et al., 2021) adapters of this rank on --lora-targets; 0: no LoRA
    lora_alpha: float = 0.0  # LoRA scaling alpha / rank; 0: alpha = rank
    lora_targets: str = "florence2"  # presets florence2 (language q/v), florence2_vision, florence2_all, or globs
    lora_dropout: float = 0.0  # dropout on the LoRA adapters' input
    train_also: str = ""  # with LoRA: glob patterns of parameters that train fully too (e.g. image_projection*)
    dropout: float | None = None  # override the language model's dropout probabilities (e.g. 0); none: the config's
    num_beams: int = 3  # beam search width of the evaluation's generation (1: greedy)
    max_new_tokens: int = 64  # the longest generated answer in the evaluation
    eval_limit: int = 0  # evaluate at most this many examples; 0: all
    anls_threshold: float = 0.5  # ANLS counts a similarity below this as 0 (the DocVQA metric's 0.5)
    val_before: bool = True  # evaluate the starting model (the "before" numbers)

# What each setting may be (`train.settings.check_settings`; seed, epochs, batch size... are checked there).
CHOICES = {"schedule": loop.SCHEDULES}
LIMITS = {"val_fraction": "(0,1)", "image_size": ">=0", "max_answer_tokens": ">=1", "lr": ">0",
          "warmup_steps": ">=0", "dropout": "[0,1)", "num_beams": ">=1", "max_new_tokens": ">=1",
          "eval_limit": ">=0", "anls_threshold": "[0,1]", "lora_rank": ">=0", "lora_alpha": ">=0",
          "lora_dropout": "[0,1)"}


def build_model(s: Settings, vocab_size: int) -> miniflorence.Florence2:
    """A converted checkpoint, or seeded random weights sized for the tokenizer."""
    if s.checkpoint:
        model = miniflorence.load_florence2(resolve_weights(s.checkpoint))
        if vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {vocab_size} tokens, the model {model.config.vocab_size}")
        config = model.config
    elif s.model == "tiny" or s.model in miniflorence.CONFIGS:
        model, config = None, miniflorence.tiny_config() if s.model == "tiny" else miniflorence.CONFIGS[s.model]
    elif s.model.endswith(".json"):
        model, config = None, read_config(s.model, miniflorence.Florence2Config.from_dict, "Florence2Config")
    else:
        raise ValueError(f"--model {s.model!r}: 'tiny', one of {sorted(miniflorence.CONFIGS)} or a .json config")
    if model is None:
        config = config.replace(vocab_size=vocab_size)
    if s.image_size:  # the weights do not depend on it (up to 50 x 32 = 1600 px)
        limit = config.image_pos_embed_size * 32
        if s.image_size % 32 or s.image_size > limit:
            raise ValueError(f"--image-size {s.image_size}: must be a multiple of 32 up to {limit}")
        config = config.replace(image_size=s.image_size)
    if s.dropout is not None:
        config = config.replace(dropout=s.dropout, attention_dropout=s.dropout, activation_dropout=s.dropout)
    if model is not None and config == model.config:
        return model
    torch.manual_seed(s.seed)
    fresh = miniflorence.Florence2(config)
    if model is not None:
        fresh.load_state_dict(model.state_dict())
    return fresh


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, pad_id: int, n_tokens: int) -> torch.Tensor:
    """Sum of the token losses over the non-pad label positions, divided by `n_tokens`.

    logits (B, t, V), labels (B, t). Padded positions contribute nothing (`ignore_index`);
    `n_tokens` is the number of real tokens in the whole batch, across processes.
    """
    targets = labels.masked_fill(labels == pad_id, -100)
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss_sum / n_tokens


def global_token_count(labels: torch.Tensor, pad_id: int, device: torch.device) -> int:
    """Real (non-pad) label tokens in this micro-batch, summed over every process."""
    n = distributed.sum_over_ranks(torch.tensor([float((labels != pad_id).sum())], device=device))
    return max(1, int(n.item()))


@torch.no_grad()
def evaluate(model: miniflorence.Florence2, dataset: DocDataset, s: Settings, tokenizer: miniflorence.Tokenizer,
             device: torch.device) -> dict[str, float]:
    """Loss (teacher forced), then generation scored by similarity, ANLS and exact match; on detection
    examples also the boxes decoded from the generation, scored by COCO mAP@0.5 and mAP@[.5:.95]."""
    was_training = model.training
    model.eval()
    n = len(dataset) if not s.eval_limit else min(s.eval_limit, len(dataset))
    pad_id, start_id = model.config.pad_token_id, model.config.decoder_start_token_id
    loss_sum, tokens, scores, predictions = 0.0, 0, {"similarity": 0.0, "anls": 0.0, "exact": 0.0}, []
    detected, truth = [], []  # per detection example: {"boxes", "labels"} predicted / ground truth
    for first in range(0, n, s.batch_size):
        batch = collate([dataset[i] for i in range(first, min(first + s.batch_size, n))], pad_id, start_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with loop.autocast(device, loop.use_bf16(s.precision, device)):
            logits = model(
                batch["pixel_values"], batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"]
            )
            count = int((batch["labels"] != pad_id).sum())
            loss_sum += masked_cross_entropy(logits, batch["labels"], pad_id, 1).item()
            tokens += count
            generated = model.generate(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                       max_new_tokens=s.max_new_tokens, num_beams=s.num_beams)
        for row, index in zip(generated.tolist(), batch["index"].tolist()):
            example = dataset.examples[index]
            answers = example.answers
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            if example.boxes is not None:  # location tokens are special tokens: keep them, drop <s> </s> <pad>
                text = strip_sequence_tokens(tokenizer.decode(row)).strip()
                found = decode_od(text, example.size)
                detected.append({"boxes": collapse_inverted(found["boxes"]), "labels": found["labels"]})
                truth.append({"boxes": list(example.boxes), "labels": list(example.labels)})
            scores["similarity"] += max(similarity(text, a) for a in answers)
            scores["anls"] += anls(text, answers, s.anls_threshold)
            scores["exact"] += exact_match(text, answers)
            predictions.append({"prediction": text, "answers": list(answers)})
    model.train(was_training)
    if s.freeze_vision:
        model.vision_tower.eval()
    result = {"loss": loss_sum / max(1, tokens), **{k: v / n for k, v in scores.items()}, "examples": predictions}
    if any(len(t["boxes"]) for t in truth):  # mAP needs a ground-truth box somewhere
        found = mean_average_precision(detected, truth)
        result.update(map50=found["map50"], map=found["map"])
    return result


def scores(result: dict) -> dict[str, float]:
    """The numbers of an `evaluate` result that go into the history and metrics.jsonl."""
    names = ("similarity", "anls", "exact", "map50", "map")
    return {"val_loss": result["loss"], **{k: result[k] for k in names if k in result}}


def export(model: miniflorence.Florence2, path: Path) -> None:
    """The converted format: LoRA merged, the tied token table stored once (`language_model.model.shared`)."""
    tensors = {k: v for k, v in merged_state_dict(model).items() if k not in TIED_KEYS}
    save_converted(path, tensors, "florence2", model.config.to_dict())


def save_best(model: miniflorence.Florence2, out: Path, s: Settings) -> None:
    """best.safetensors, and with LoRA best_lora.safetensors: the adapters and, whole, the tensors
    that train fully (--train-also; the tied token table under its stored name only, as `export`)."""
    export(model, out / "best.safetensors")
    if s.lora_rank:
        trained = [n for n, p in model.named_parameters()
                   if p.requires_grad and not n.endswith((".lora_A", ".lora_B")) and n not in TIED_KEYS]
        save_lora(out / "best_lora.safetensors", model, "florence2", s.lora_targets, trained)


def train(s: Settings, d: distributed.Dist) -> dict:
    """The whole run; returns the history and the scores before/after. See the module docstring."""
    out, state = run_folder.start_run(s, d, LIMITS, CHOICES)
    last_path = out / "last.pt"
    if not s.data:
        raise ValueError("--data is required: a JSONL file of {image, question, answer} or {image, prefix, suffix}, "
                         "a COCO instances JSON or parquet")

    # ---- tokenizer, model, data (bad lines skipped and counted)
    tokenizer = miniflorence.Tokenizer.from_dir(s.tokenizer)
    model = build_model(s, tokenizer.vocab_size).to(d.device).train()
    c, bf16 = model.config, loop.use_bf16(s.precision, d.device)
    skipped = report.Skipped()
    categories = [name for name in s.categories.split(",") if name.strip()]
    examples = load_data(s.data, s.task_prefix, tokenizer, s.max_answer_tokens, skipped, s.images, categories,
                         s.split, s.columns)
    if s.val_data:
        val_examples = load_data(s.val_data, s.task_prefix, tokenizer, s.max_answer_tokens, skipped, "", categories,
                                 s.val_split or s.split, s.columns)
    else:  # a seeded hold-out of the training lines
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(s.seed)).tolist()
        n_val = max(1, round(s.val_fraction * len(examples)))
        val_examples = [examples[i] for i in order[:n_val]]
        examples = [examples[i] for i in sorted(order[n_val:])]
    train_set = DocDataset(examples, tokenizer, c.image_size)
    val_set = DocDataset(val_examples, tokenizer, c.image_size)
    report.log(f"{len(train_set)} train / {len(val_set)} val examples; skipped: {skipped.summary()}")

    # ---- what trains: everything, or everything but the vision tower; with LoRA the adapters (and
    # --train-also) only. --freeze-vision also keeps the tower in eval mode (no drop path).
    if s.train_also and not s.lora_rank:
        raise ValueError("--train-also needs --lora-rank (without LoRA everything but a frozen vision tower trains)")
    if s.lora_rank:
        model.requires_grad_(False)
        lora_names = add_lora(model, s.lora_targets, s.lora_rank, s.lora_alpha or s.lora_rank, s.lora_dropout)
        for pattern in (p for p in s.train_also.split(",") if p):
            matched = [p for n, p in model.named_parameters() if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(f"--train-also {pattern!r} matches no parameter of the model")
            for p in matched:
                p.requires_grad_(True)
    if s.freeze_vision:
        if not s.lora_rank:
            model.vision_tower.requires_grad_(False)
        model.vision_tower.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    trained, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    lora_note = f"; LoRA rank {s.lora_rank} on {len(lora_names)} layers" if s.lora_rank else ""
    report.log(f"trainable parameters: {trained:,} of {total:,} ({100 * trained / total:.2f}%){lora_note}")
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    _, steps_per_epoch = distributed.steps_per_epoch(len(train_set), s.batch_size, s.accum_steps, d)
    total_steps = steps_per_epoch * s.epochs
    scheduler = loop.make_scheduler(optimizer, total_steps, s.warmup_steps, s.schedule)
    ddp = distributed.wrap_ddp(model, d)
    running = torch.zeros((), device=d.device)  # W x this rank's share of the step's loss, over its micro-batches
    pad_id, start_id = c.pad_token_id, c.decoder_start_token_id

    # ---- start or resume
    run_folder.begin_run(out, s, state, d)
    step, start_epoch, start_micro, best = 0, 0, 0, -1.0
    history: dict[str, list] = {"train_loss": [], "val_loss": [], "similarity": [], "anls": [], "exact": [],
                                "map50": [], "map": []}
    metric = "map50" if any(ex.boxes for ex in val_set.examples) else "anls"  # what picks the best model
    if state is not None:
        run_folder.load_model_state(model, state["model"], last_path)
        step, start_epoch, start_micro = run_folder.resume(state, optimizer, scheduler)
        best, history = state["best"], state["history"]
    elif s.val_before and d.is_main:
        r = evaluate(model, val_set, s, tokenizer, d.device)
        report.log_epoch(history, out / "metrics.jsonl", 0, 0, s.epochs, scores(r))

    def snapshot(epoch: int, micro: int) -> dict:  # what last.pt holds
        state = run_folder.run_state(optimizer, scheduler, step, epoch, micro, history, s)
        return {"model": model.state_dict(), "best": best, **state}

    def summary(stopped: bool) -> dict:  # what `train` returns
        return {"history": history, "best_anls": best if metric == "anls" else None, "best": {metric: best},
                "step": step, "stopped": stopped, "skipped": dict(skipped)}

    collate_fn = functools.partial(collate, pad_id=pad_id, decoder_start_id=start_id)
    save_last = functools.partial(export, model)  # last.safetensors, beside each last.pt
    for epoch in range(start_epoch, s.epochs):
        first = start_micro if epoch == start_epoch else 0  # a resumed epoch goes on where it stopped
        loader = distributed.epoch_loader(train_set, epoch, s.seed, s.batch_size, s.accum_steps, d, first, s.workers,
                                     collate_fn)
        bar = report.progress(loader, desc=f"epoch {epoch + 1}/{s.epochs}", enabled=s.progress)
        for micro, batch in enumerate(bar, start=first):
            batch = {k: v.to(d.device) for k, v in batch.items()}
            n_tokens = global_token_count(batch["labels"], pad_id, d.device)
            sync = (micro + 1) % s.accum_steps == 0  # the last micro-batch of an optimizer step
            with distributed.no_sync_unless(ddp, sync):
                with loop.autocast(d.device, bf16):
                    logits = ddp(batch["pixel_values"], batch["input_ids"], batch["decoder_input_ids"],
                                 batch["attention_mask"])  # (B, t, V)
                loss = masked_cross_entropy(logits, batch["labels"], pad_id, n_tokens)  # this rank's share
                # DDP averages gradients over the W ranks; W x the shares = the whole batch's mean.
                running += loop.backward(loss * d.world_size / s.accum_steps, step, d.device, last_path)
            if sync:
                step, used_lr, grad_norm = loop.optimizer_step(optimizer, scheduler, params, s.clip_grad)
                report.log_step(history, bar, out / "metrics.jsonl", step, {"train_loss": running}, used_lr, grad_norm)
                if run_folder.maybe_checkpoint(last_path, snapshot, epoch, micro + 1, step, s.save_every,
                                               s.stop_after, save_last):
                    return summary(stopped=True)

        # ---- evaluation by generation (rank 0), best model in the converted format, last.pt, curves
        if d.is_main:
            r = evaluate(model, val_set, s, tokenizer, d.device)
            report.log_epoch(history, out / "metrics.jsonl", step, epoch + 1, s.epochs, scores(r))
            (out / "predictions.json").write_text(json.dumps(r["examples"][:200], indent=1))
            if r.get(metric, best) > best:  # (with --eval-limit the evaluated part may hold no box)
                best = r[metric]
                save_best(model, out, s)
                report.log(f"new best {metric} {best:.3f}: wrote {out / 'best.safetensors'}")
        run_folder.end_epoch(last_path, snapshot, epoch + 1, out / "curves.png", {
            "loss": {"train": history["train_loss"], "val": history["val_loss"]},
            "answers": {"similarity": history["similarity"], "ANLS": history["anls"], "exact": history["exact"],
                        **({"mAP@0.5": history["map50"], "mAP@[.5:.95]": history["map"]} if metric == "map50" else {})},
        }, save_last, log_y=("loss",))
    return summary(stopped=False)


def main(argv: list[str] | None = None) -> dict:
    return script.run_script(Settings, train, argv, EXAMPLES)


if __name__ == "__main__":
    main()

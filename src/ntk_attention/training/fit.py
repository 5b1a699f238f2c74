"""HF Trainer wiring shared by train, eval and compare.

One Trainer subclass adds what the methods need on top of the stock loop: the head gets its own
learning rate (the head policy is the same for every method, so its step size is too), and
checkpoints of adapter methods hold only the trainable tensors instead of the whole base model.
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from . import data as D

SAFE_WEIGHTS_NAME = "model.safetensors"  # the file Trainer reloads for non-PEFT models
DEFAULT_MAX_LENGTH = {"classification": 128, "causal-lm": 512, "language-modeling": 256,
                      "image-classification": None}  # images: the processor's size
SCORES = ("accuracy", "mcc", "loss")  # what evaluation reports; perplexity follows from the loss


LOWER_IS_BETTER = "loss"  # the one selection metric that is minimised (accuracy, MCC, ... are maximised)


def selection_score(metric: str, value: float) -> float:
    """``value`` of the selection metric ``metric`` as a score where higher is better (the loss negated)."""
    return -value if metric == LOWER_IS_BETTER else value

@dataclass
class FitSettings:
    output_dir: str
    task: str
    learning_rate: float
    head_learning_rate: float
    epochs: float = 2.0
    batch_size: int = 32
    eval_batch_size: int = 64
    seed: int = 0
    warmup: float = 0.06  # fraction of the steps
    weight_decay: float = 0.0
    group_by_length: bool = True
    save_full_checkpoints: bool = False  # `full` keeps whole-model checkpoints
    metric: str | None = None  # picks the best epoch: accuracy / mcc (classification) or loss (default per task)


class MethodTrainer(transformers.Trainer):
    def __init__(self, *args, task: str, head_modules: list[str], head_learning_rate: float, save_full_checkpoints: bool,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.task = task
        self.head_modules = head_modules
        self.head_learning_rate = head_learning_rate
        self.save_full_checkpoints = save_full_checkpoints

    def _is_head(self, name: str) -> bool:
        return any(f"{head}." in name for head in self.head_modules)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in trainable if not self._is_head(n)], "lr": self.args.learning_rate},
                {"params": [p for n, p in trainable if self._is_head(n)], "lr": self.head_learning_rate},
            ]
            groups = [group for group in groups if group["params"]]
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict=None):
        import peft

        if self.save_full_checkpoints or isinstance(self.model, peft.PeftModel):
            return super()._save(output_dir, state_dict)
        # Only the trainable tensors: Trainer reloads this file with load_state_dict(strict=False).
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            state = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(state, os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})


def encode(table, tokenizer, task: str, columns: D.Columns, max_length: int, source: str):
    """``table`` as the Trainer's input for ``task``; ``tokenizer`` is the image processor for images."""
    if task == "image-classification":
        return D.encode_images(table, tokenizer, columns, source)
    if task == "classification":
        return D.encode_classification(table, tokenizer, D.text_column(table, columns, source), columns.label, max_length,
                                       columns.text_pair)
    if task == "language-modeling":
        return D.encode_blocks(table, tokenizer, D.text_column(table, columns, source), max_length)
    return D.encode_causal(table, tokenizer, columns.prompt, columns.answer, max_length)


def classification_metrics(prediction: transformers.EvalPrediction) -> dict:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted, labels = np.argmax(logits, axis=-1), prediction.label_ids
    return {"accuracy": float((predicted == labels).mean()), "mcc": matthews_correlation(predicted, labels)}


def matthews_correlation(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K); 0 when a prediction or the
    labels are constant, as scikit-learn returns."""
    classes = int(max(predicted.max(initial=0), labels.max(initial=0))) + 1
    confusion = np.zeros((classes, classes), dtype=np.float64)
    np.add.at(confusion, (labels.astype(int), predicted.astype(int)), 1)
    n, correct = confusion.sum(), np.trace(confusion)
    true, pred = confusion.sum(axis=1), confusion.sum(axis=0)
    denominator = math.sqrt((n * n - pred @ pred) * (n * n - true @ true))
    return float((correct * n - pred @ true) / denominator) if denominator else 0.0


def epoch_evaluations(log_history: list[dict], metric: str, task: str | None = None) -> list[dict]:
    """The validation scores after each epoch, from a Trainer's log (``trainer.state.log_history``, or the
    ``log_history`` of a checkpoint's trainer_state.json): the entries that score ``metric``, in order."""
    return [{"epoch": log["epoch"], **named_scores(log, task)} for log in log_history if f"eval_{metric}" in log]


def ends_at_last_epoch(best_epoch: float | None, epochs: float | None) -> bool:
    """The best epoch is the last of several: like a grid's edge, the budget may have stopped the run short."""
    return bool(best_epoch is not None and epochs and epochs > 1 and math.isclose(best_epoch, epochs))


def named_scores(metrics: dict, task: str | None, prefix: str = "eval_") -> dict:
    """Scores without the prefix; perplexity (``exp`` of the mean token loss) for language modelling."""
    scores = {key[len(prefix):]: value for key, value in metrics.items()
              if key.startswith(prefix) and key[len(prefix):] in SCORES}
    if task == "language-modeling" and "loss" in scores:
        scores["perplexity"] = math.exp(scores["loss"])
    return scores


def make_trainer(model, tokenizer, settings: FitSettings, head_modules: list[str], train_data=None, eval_data=None):
    classification = settings.task in D.CLASSIFICATION_TASKS
    has_eval = eval_data is not None
    args = transformers.TrainingArguments(
        output_dir=settings.output_dir,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup,
        lr_scheduler_type="linear",
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="epoch",
        save_total_limit=2,  # the last two; with load_best_model_at_end the best one as well
        load_best_model_at_end=has_eval,
        metric_for_best_model=settings.metric or ("accuracy" if classification else "loss"),
        greater_is_better=LOWER_IS_BETTER != (settings.metric or ("accuracy" if classification else "loss")),
        # images have no length to group by
        train_sampling_strategy="group_by_length" if settings.group_by_length and settings.task != "image-classification"
        else "random",
        seed=settings.seed,
        data_seed=settings.seed,  # the shuffle must not depend on what else drew random numbers first
        logging_steps=10,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),  # lets torchrun / accelerate run several CPU processes (gloo)
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # encoded data holds model inputs only; wrappers hide forward's signature
        label_names=["labels"],
    )
    collator = (transformers.DataCollatorWithPadding(tokenizer) if settings.task == "classification"
                # equal blocks; images of the processor's one size
                else transformers.default_data_collator if settings.task in ("language-modeling", "image-classification")
                else transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    trainer = MethodTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=classification_metrics if classification else None,
        task=settings.task,
        head_modules=head_modules,
        head_learning_rate=settings.head_learning_rate,
        save_full_checkpoints=settings.save_full_checkpoints,
    )
    # Trainer guesses from a **kwargs forward that the loss takes num_items_in_batch and then scales it
    # by the number of processes; classification losses are per-process means, so that doubles them.
    trainer.model_accepts_loss_kwargs = not classification
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        # accelerate (1.15) shards only on accelerator devices; on CPU it silently trains with DDP instead
        raise ValueError(f"FSDP was asked for (accelerate launch --use_fsdp) but accelerate did not enable it on "
                         f"{trainer.args.device}: it runs FSDP on GPUs/XPUs/NPUs only, and would train with "
                         "plain DDP here. Launch without --use_fsdp for DDP on CPU (torchrun or accelerate launch "
                         "--multi_gpu), or use a GPU machine for FSDP.")
    return trainer


def score(trainer: transformers.Trainer, data) -> dict:
    """Accuracy and MCC (classification), loss, and perplexity (language modelling) of ``trainer.model``
    on ``data``, without the ``eval_`` prefix."""
    metrics = trainer.evaluate(eval_dataset=data, metric_key_prefix="eval")
    # evaluate() marks the model as prepared by accelerate; a later train() would then skip the
    # DistributedDataParallel wrap and every process would step on its own gradients.
    trainer.model.__dict__.pop("_is_accelerate_prepared", None)
    return named_scores(metrics, trainer.task)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

"""LLaVA-1.5 as a fer plugin (docs/vision_llm.md): the ``llava`` backbone (vision / projected /
answer / likelihood features, LoRA through peft, gradient checkpointing, bf16, optional 4-/8-bit
loading), the ``answer_scores`` head, the ``llava_lm`` loss, the ``llava_adamw`` optimizer, the
``llava_adapters`` callback and the `fer zeroshot` and `fer llava-adapters` commands.

transformers and peft are imported when a component is built, not when fer starts.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from fer_core.api import hookimpl, traits

_Bool = Annotated[bool, Field(strict=True)]
_LR = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
_Index = Annotated[int, Field(ge=0, strict=True)]

#: LLaVA-1.5's conversation format; ``{answers}`` becomes the answers joined by ", "
DEFAULT_PROMPT = ("USER: <image>\nWhich facial expression does this person show? "
                  "Answer with one of: {answers}. ASSISTANT:")


def make_llava_backbone(
    *,
    model_dir: str,
    mode: Literal["vision", "projected", "answer", "likelihood"] = "vision",
    prompt: str = DEFAULT_PROMPT,
    answers: list[str] | dict[str, str] = [],  # noqa: B006 - validated and copied by the registry
    answer_prefix: str = " ",
    eos: _Bool = False,
    length_norm: Literal["sum", "mean"] = "sum",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    attention: Literal["sdpa", "eager"] = "sdpa",
    quantization: Literal["none", "8bit", "4bit"] = "none",
    lora_rank: Annotated[int, Field(ge=0, strict=True)] = 0,
    lora_alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 16.0,
    lora_dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.05,
    lora_targets: Annotated[list[str], Field(min_length=1)] = ["q_proj", "v_proj"],  # noqa: B006
    lora_on: Literal["language_model", "vision_tower", "both"] = "language_model",
    train_projector: _Bool = False,
):
    """LLaVA-1.5 (transformers' LlavaForConditionalGeneration) from a local directory.

    `model_dir`: a directory written by save_pretrained (model, tokenizer, image processor), e.g. a
    download of llava-hf/llava-1.5-7b-hf; nothing is downloaded. `mode`: "vision" (the vision
    tower's pooled output), "projected" (mean of the projected image tokens), "answer" (the language
    model's hidden state after `prompt`) or "likelihood" (the log-likelihood of each of `answers`,
    the verbalised class names, after `prompt`: zero-shot and generative fine-tuning with the
    `answer_scores` head). `answers`: a list in the dataset's class order or a table {class = answer}.
    `length_norm`: sum or mean of the answer's token log-probabilities; `eos`: close every answer
    with the end-of-sequence token. `dtype`: the weights' dtype ("auto": bfloat16 on CUDA, else
    float32). `lora_rank` > 0 adds LoRA adapters (peft) on `lora_targets` of `lora_on`; everything else
    is frozen (`train_projector` trains the projector fully). Checkpoints hold the trainable tensors only.
    """
    from .backbone import build_llava_backbone

    return build_llava_backbone(
        model_dir=model_dir, mode=mode, prompt=prompt, answers=answers, answer_prefix=answer_prefix, eos=eos,
        length_norm=length_norm, dtype=dtype, attention=attention, quantization=quantization, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets, lora_on=lora_on,
        train_projector=train_projector)


@traits(example={"select": [0, 1, 2, 3, 4]})  # the contract test's 16 features → 5 outputs
def make_answer_scores(in_features: int, num_outputs: int, /, *, select: list[_Index] = []):  # noqa: B006
    """The backbone's per-class scores as logits, unchanged: with the llava backbone in mode
    "likelihood", softmax over the classes' answer log-likelihoods. No parameters. `select`: the
    features that are the classes' scores, in class order (default: all, one per class)."""
    from .components import answer_scores

    return answer_scores(in_features, num_outputs, list(select))


@traits(accepts_soft_labels=True)
def make_llava_lm(task, /):
    """The language-model loss on the target class name: -log P(answer of the label | prompt, image),
    read from the `answer_scores` head's outputs (the llava backbone in mode "likelihood"). Under
    label mixing, the expected loss over the mixed labels."""
    from .components import AnswerNLL

    return AnswerNLL()


def make_llava_adamw(params, /, *, lr: _LR = 1e-3, adapter_lr: _LR = 2e-4,
                     weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 0.0,
                     betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
                     ) -> torch.optim.Optimizer:
    """AdamW with two learning rates: `adapter_lr` for the backbone's trainable tensors (LoRA
    adapters, a trained projector: those tagged `fer_group = "adapters"`), `lr` for the heads and
    everything else."""
    from .components import adamw_groups

    return adamw_groups(list(params), lr=lr, adapter_lr=adapter_lr, weight_decay=weight_decay, betas=tuple(betas))


def make_llava_adapters(*, dir: str = "adapters"):
    """At the end of `fer run`: the LoRA adapters (peft's adapter_model.safetensors and
    adapter_config.json, referring to the base directory) and the heads (trainable.safetensors)
    under `<run dir>/<dir>`."""
    from .components import ExportAdapters

    return ExportAdapters(dir)


@hookimpl
def register_backbones(register):
    register("llava", make_llava_backbone)


@hookimpl
def register_heads(register):
    register("answer_scores", make_answer_scores)


@hookimpl
def register_losses(register):
    register("llava_lm", make_llava_lm)


@hookimpl
def register_optimizers(register):
    register("llava_adamw", make_llava_adamw)


@hookimpl
def register_callbacks(register):
    register("llava_adapters", make_llava_adapters)


@hookimpl
def register_commands(cli):
    from .commands import register

    register(cli)

"""The ``llava`` backbone: transformers' LlavaForConditionalGeneration from a local directory.

Four feature modes (``mode``):

- ``vision``: the vision tower's pooled output (CLIP: the post-layernorm class token), B×D_vision;
- ``projected``: the mean of the projected image tokens (what the language model sees), B×D_text;
- ``answer``: the language model's last hidden state at the answer position, i.e. after the prompt
  (``prompt``, with ``<image>`` where the image tokens go), B×D_text;
- ``likelihood``: one score per class: the log-likelihood of each verbalised class name
  (``answers``) as the answer to the prompt, B×C. With the ``answer_scores`` head these are the
  logits, so softmax over them gives the zero-shot probabilities; never free-text parsing.

All answers are scored in one forward pass: the prompt (image tokens included) is followed by every
answer, each answer attending to the prompt and to itself only (a block mask, positions restarting
after the prompt), so the cost is one prompt plus the answers' few tokens, not C prompts.

Only trainable tensors (LoRA adapters, a trained projector) are in ``state_dict()``: a checkpoint
holds the adapters and the heads, and refers to the base weights by ``model_dir`` (plus a hash of
its config.json) in the backbone's extra state. Loading such a checkpoint into a model built from
the same recipe leaves the frozen base weights as loaded from ``model_dir``.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from fer_core.api import Backbone, CamTarget, FerError, Preprocessing

MODES = ("vision", "projected", "answer", "likelihood")
KEY = "model.backbone"
#: the tag an optimizer reads (``param.fer_group``) to give adapters their own learning rate
ADAPTER_GROUP = "adapters"


def _parts(llava: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(vision tower, projector, decoder without head, lm_head) in the transformers ≥ 4.52 layout
    (``model.vision_tower``…) or the older one (``vision_tower``, ``language_model.model``)."""
    inner = getattr(llava, "model", None)
    if inner is not None and hasattr(inner, "vision_tower"):
        return inner.vision_tower, inner.multi_modal_projector, inner.language_model, llava.lm_head
    lm = llava.language_model
    return llava.vision_tower, llava.multi_modal_projector, lm.model, lm.lm_head


def config_sha256(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()


class LlavaBackbone(Backbone):
    prefers_channels_last = False  # a ViT and a transformer: channels_last gains nothing

    def __init__(self, net: nn.Module, *, model_dir: Path, tokenizer: Any, pre: Preprocessing, mode: str,
                 prompt: str, answers: Sequence[str], answer_classes: Sequence[str] | None, answer_prefix: str,
                 eos: bool, length_norm: str, attention: str, lora: dict[str, Any] | None) -> None:
        super().__init__()
        self.net = net  # the LLaVA model, or the peft model around it
        self.model_dir = model_dir
        self.config_sha256 = config_sha256(model_dir)
        self.preprocessing = pre
        self.mode = mode
        self.prompt = prompt
        self.answers = list(answers)
        self.answer_classes = list(answer_classes) if answer_classes is not None else None
        self.length_norm = length_norm
        self.attention = attention
        self.lora = lora
        cfg = self.llava.config
        self.vision_feature_layer = cfg.vision_feature_layer
        self.select_strategy = cfg.vision_feature_select_strategy
        vc = cfg.vision_config
        self.grid = (pre.input_size[0] // vc.patch_size, pre.input_size[1] // vc.patch_size)
        self.num_image_tokens = self.grid[0] * self.grid[1] + (0 if self.select_strategy == "default" else 1)
        if mode == "vision":
            self.feature_dim = int(vc.hidden_size)
        elif mode in ("projected", "answer"):
            self.feature_dim = int(cfg.text_config.hidden_size)
        else:
            self.feature_dim = len(self.answers)
        if mode in ("answer", "likelihood"):
            self._prepare_text(tokenizer, answer_prefix, eos)
        self._tag_trainable()
        self.register_load_state_dict_pre_hook(self._remember_prefix)
        self.register_load_state_dict_post_hook(self._frozen_are_not_missing)

    # ------------------------------------------------------------------ parts
    @property
    def llava(self) -> nn.Module:
        get = getattr(self.net, "get_base_model", None)
        return get() if callable(get) else self.net

    def _tag_trainable(self) -> None:
        for _, p in self.net.named_parameters():
            if p.requires_grad:
                p.fer_group = ADAPTER_GROUP  # type: ignore[attr-defined]

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ tokens
    def _prepare_text(self, tok: Any, answer_prefix: str, eos: bool) -> None:
        """Token ids of the prompt around the image and of every answer, and the index tensors of
        the packed likelihood pass (non-persistent buffers: they follow .to(device))."""
        image_id = int(self.llava.config.image_token_id)
        image_token = tok.convert_ids_to_tokens(image_id)
        text = self.prompt.replace("{answers}", ", ".join(self.answers))
        if text.count(image_token) != 1:
            raise FerError(f"{KEY}.prompt: must hold the image token '{image_token}' exactly once (got {self.prompt!r})")
        ids = list(tok(text)["input_ids"])
        if ids.count(image_id) != 1:
            raise FerError(f"{KEY}.prompt: the tokenizer did not keep '{image_token}' as one token (id {image_id})")
        at = ids.index(image_id)
        before, after = ids[:at], ids[at + 1:]
        prefix_len = len(before) + self.num_image_tokens + len(after)
        answer_ids: list[list[int]] = []
        for a in self.answers:
            full = list(tok(text + answer_prefix + a)["input_ids"])
            # the answer's tokens as they follow the prompt; separately if the boundary merged
            got = (full[len(ids):] if full[:len(ids)] == ids
                   else list(tok(answer_prefix + a, add_special_tokens=False)["input_ids"]))
            if eos:
                if tok.eos_token_id is None:
                    raise FerError(f"{KEY}.eos: the tokenizer has no end-of-sequence token")
                got.append(int(tok.eos_token_id))
            if not got:
                raise FerError(f"{KEY}.answers: '{a}' tokenizes to nothing")
            answer_ids.append(got)
        seen: dict[tuple[int, ...], str] = {}
        for a, t in zip(self.answers, answer_ids):
            if tuple(t) in seen:
                raise FerError(f"{KEY}.answers: '{seen[tuple(t)]}' and '{a}' are the same tokens; the classes "
                               "could not be told apart")
            seen[tuple(t)] = a
        if not eos:
            for a, t in zip(self.answers, answer_ids):
                for b, u in zip(self.answers, answer_ids):
                    if a != b and len(t) < len(u) and u[:len(t)] == t:
                        raise FerError(f"{KEY}.answers: '{a}' is a prefix of '{b}', so its likelihood is not comparable; "
                                       "set eos = true (the end-of-sequence token closes every answer)")
        self.answer_ids = answer_ids
        n_ans = sum(len(t) for t in answer_ids)
        total = prefix_len + n_ans
        starts, s = [], prefix_len
        for t in answer_ids:
            starts.append(s)
            s += len(t)
        pos = list(range(prefix_len)) + [prefix_len + j for t in answer_ids for j in range(len(t))]
        mask = torch.ones(total, total, dtype=torch.bool).tril_()
        for c, t in enumerate(answer_ids):  # an answer sees the prompt and itself, never another answer
            lo, hi = starts[c], starts[c] + len(t)
            mask[lo:hi, prefix_len:lo] = False
        # the hidden state predicting answer token j: the prompt's last token for j = 0, else token j-1
        pred = [p for c, t in enumerate(answer_ids) for p in [prefix_len - 1] + list(range(starts[c], starts[c] + len(t) - 1))]
        self.register_buffer("_before", torch.tensor(before, dtype=torch.long), persistent=False)
        self.register_buffer("_after", torch.tensor(after, dtype=torch.long), persistent=False)
        self.register_buffer("_answers", torch.tensor([i for t in answer_ids for i in t], dtype=torch.long), persistent=False)
        self.register_buffer("_pos", torch.tensor(pos, dtype=torch.long), persistent=False)
        self.register_buffer("_mask", mask, persistent=False)
        self.register_buffer("_pred", torch.tensor(pred, dtype=torch.long), persistent=False)
        self.register_buffer("_segment", torch.tensor([c for c, t in enumerate(answer_ids) for _ in t], dtype=torch.long),
                             persistent=False)
        self.register_buffer("_lengths", torch.tensor([len(t) for t in answer_ids], dtype=torch.float32), persistent=False)
        self.prefix_len = prefix_len

    # ------------------------------------------------------------------ forward
    def _dtype(self) -> torch.dtype:
        vision, *_ = _parts(self.llava)
        return next(vision.parameters()).dtype

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """B×N×D_text: the projected image tokens the language model reads."""
        out = self.llava.get_image_features(pixel_values=images.to(self._dtype()), return_dict=True)
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return feats if isinstance(feats, torch.Tensor) else torch.stack(list(feats))

    def _decode(self, images: torch.Tensor, with_answers: bool) -> torch.Tensor:
        _, _, decoder, _ = _parts(self.llava)
        img = self.image_tokens(images)
        b = img.shape[0]
        embed = decoder.get_input_embeddings()
        pieces = [embed(self._before)[None].expand(b, -1, -1), img.to(embed.weight.dtype),
                  embed(self._after)[None].expand(b, -1, -1)]
        n = self.prefix_len
        if with_answers:
            pieces.append(embed(self._answers)[None].expand(b, -1, -1))
            n = self._mask.shape[0]
        x = torch.cat(pieces, dim=1)
        if with_answers:
            m = self._mask[None, None]
            if self.attention == "eager":  # additive float mask; sdpa takes the boolean one
                m = torch.zeros(m.shape, dtype=x.dtype, device=x.device).masked_fill_(~m, torch.finfo(x.dtype).min)
            kwargs = {"attention_mask": m, "position_ids": self._pos[None].expand(b, -1)}
        else:
            kwargs = {"position_ids": self._pos[None, :n].expand(b, -1)}
        out = decoder(inputs_embeds=x, use_cache=False, **kwargs)
        return out.last_hidden_state

    def answer_log_likelihoods(self, images: torch.Tensor) -> torch.Tensor:
        """B×C: log P(answer c | prompt, image), summed over its tokens (``length_norm = "mean"``: averaged)."""
        *_, lm_head = _parts(self.llava)
        h = self._decode(images, with_answers=True)[:, self._pred]  # B×T×D, T = all answer tokens
        logp = torch.log_softmax(lm_head(h).float(), dim=-1)
        tok = logp.gather(2, self._answers[None, :, None].expand(h.shape[0], -1, 1))[..., 0]  # B×T
        ll = torch.zeros(h.shape[0], len(self.answers), device=tok.device).index_add_(1, self._segment, tok)
        return ll / self._lengths if self.length_norm == "mean" else ll

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode == "vision":
            vision, *_ = _parts(self.llava)
            return vision(pixel_values=images.to(self._dtype())).pooler_output.float()
        if self.mode == "projected":
            return self.image_tokens(images).float().mean(dim=1)
        if self.mode == "answer":
            return self._decode(images, with_answers=False)[:, -1].float()
        return self.answer_log_likelihoods(images)

    # ------------------------------------------------------------------ capabilities
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        m = self.llava
        kwargs = {"use_reentrant": False}  # frozen inputs: the reentrant variant would drop the adapters' gradients
        if hasattr(m, "activation_checkpointing_enable"):  # transformers ≥ 5 (the old names warn)
            if enable:
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                m.activation_checkpointing_disable()
        elif enable:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            m.gradient_checkpointing_disable()

    def cam_target(self) -> CamTarget | None:
        """The vision tower's last layer the features depend on (LLaVA reads layer -2): its first
        layer norm's output, class token first, then the patch grid."""
        vision, *_ = _parts(self.llava)
        enc = getattr(vision, "encoder", None) or getattr(getattr(vision, "vision_model", None), "encoder", None)
        layers = getattr(enc, "layers", None)
        if layers is None:
            return None
        n = len(layers)
        used = n - 1 if self.mode == "vision" else (self.vision_feature_layer if isinstance(self.vision_feature_layer, int)
                                                      else max(self.vision_feature_layer)) % (n + 1) - 1
        used = max(used, 0)
        name = next(k for k, m in self.named_modules() if m is layers[used].layer_norm1)
        return CamTarget(layers[used].layer_norm1, name, "tokens", 1, self.grid)

    # ------------------------------------------------------------------ adapter-only state
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The trainable tensors only (adapters, a trained projector) plus the reference to the base."""
        if destination is None:
            from collections import OrderedDict

            destination = OrderedDict()
        for n, p in self.named_parameters():
            if p.requires_grad:
                destination[prefix + n] = p if keep_vars else p.detach()
        destination[prefix + "_extra_state"] = self.get_extra_state()
        return destination

    def get_extra_state(self) -> dict[str, Any]:
        return {"model_dir": str(self.model_dir), "config_sha256": self.config_sha256, "mode": self.mode,
                "answers": list(self.answers), "lora": dict(self.lora or {}), "trainable": len(self.trainable_names())}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            return
        if state.get("mode") not in (None, self.mode) or ("answers" in state and list(state["answers"]) != self.answers):
            raise FerError(f"{KEY}: the checkpoint was trained with mode '{state.get('mode')}' and answers "
                           f"{state.get('answers')}, the recipe builds mode '{self.mode}' with {self.answers}")
        if state.get("config_sha256") not in (None, self.config_sha256):
            msg = (f"{KEY}.model_dir: {self.model_dir} is not the base model the adapters were trained on "
                   f"({state.get('model_dir')}): its config.json differs")
            warnings.warn(msg, stacklevel=2)

    def _remember_prefix(self, module: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
        self._load_prefix = prefix

    def _frozen_are_not_missing(self, module: nn.Module, incompatible: Any) -> None:
        """A checkpoint holds the trainable tensors only: the frozen base is no missing key."""
        prefix = getattr(self, "_load_prefix", "")
        keep = {prefix + n for n in self.trainable_names()} | {prefix + "_extra_state"}
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(prefix) or k in keep]


# ---------------------------------------------------------------------- building


def resolve_answers(answers: list[str] | dict[str, str], classes: Sequence[str]) -> list[str]:
    """The answers in the dataset's class order: a list as given (one per class), a table
    {class name: answer} matched case-insensitively, nothing = the class names in lower case."""
    if not answers:
        return [c.lower() for c in classes]
    if isinstance(answers, list):
        if len(answers) != len(classes):
            raise FerError(f"{KEY}.answers: {len(answers)} answers for the dataset's {len(classes)} classes {list(classes)}")
        return list(answers)
    by_name = {k.lower(): v for k, v in answers.items()}
    missing = [c for c in classes if c.lower() not in by_name]
    extra = sorted(set(by_name) - {c.lower() for c in classes})
    if missing or extra:
        raise FerError(f"{KEY}.answers: the table must name every class of the dataset once"
                       + (f"; missing: {missing}" if missing else "")
                       + (f"; not classes of the dataset: {extra}" if extra else ""))
    return [by_name[c.lower()] for c in classes]


def _preprocessing(model_dir: Path, vision_size: int) -> Preprocessing:
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise FerError(f"{KEY}.model_dir: {model_dir}: no image processor could be read ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}); save it there with image_processor.save_pretrained") from None

    def hw(size: Any) -> tuple[int, int] | None:
        if size is None:
            return None
        get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
        if get("height") and get("width"):
            return int(get("height")), int(get("width"))
        if get("shortest_edge"):
            return int(get("shortest_edge")), int(get("shortest_edge"))
        return None

    size = (hw(getattr(proc, "crop_size", None)) if getattr(proc, "do_center_crop", False) else None) \
        or hw(getattr(proc, "size", None)) or (vision_size, vision_size)
    if size != (vision_size, vision_size):
        raise FerError(f"{KEY}.model_dir: the image processor makes {size[0]}×{size[1]} images but the vision tower "
                       f"was built for {vision_size}×{vision_size}")
    mean, std = tuple(float(v) for v in proc.image_mean), tuple(float(v) for v in proc.image_std)
    return Preprocessing(input_size=size, channels=3, mean=mean, std=std)


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _quantization(quantization: str, dtype: torch.dtype) -> dict[str, Any]:
    if quantization == "none":
        return {}
    if not torch.cuda.is_available():
        raise FerError(f"{KEY}.quantization: '{quantization}' loading needs a CUDA device (bitsandbytes); use 'none' here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FerError(f"{KEY}.quantization: '{quantization}' needs bitsandbytes: "
                       "pip install 'fer-toolkit[bitsandbytes]'") from None
    from transformers import BitsAndBytesConfig

    skip = ["vision_tower", "multi_modal_projector", "lm_head"]  # QLoRA quantizes the language model only
    cfg = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip)
           if quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip))
    return {"quantization_config": cfg, "device_map": {"": torch.cuda.current_device()}}


def _lora(llava: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], on: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    towers = {"language_model": ["language_model"], "vision_tower": ["vision_tower"],
              "both": ["language_model", "vision_tower"]}[on]
    pattern = rf".*({'|'.join(towers)})\..*\.({'|'.join(re.escape(t) for t in targets)})"
    names = [n for n, _ in llava.named_modules()]
    if not any(re.fullmatch(pattern, n) for n in names):
        examples = sorted({n.rsplit(".", 1)[-1] for n, m in llava.named_modules()
                           if isinstance(m, nn.Linear) and any(t in n for t in towers)})
        raise FerError(f"{KEY}.lora_targets: no module of the {' and '.join(towers)} is named {targets}; "
                       f"linear layers there: {', '.join(examples)}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(llava, cfg)


def load_llava(model_dir: str, *, dtype: str = "auto", attention: str = "sdpa",
               quantization: str = "none") -> tuple[Any, Any, Path]:
    """(model, tokenizer, resolved directory); every problem is one FerError naming ``model_dir``."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FerError(f"{KEY}.model_dir: '{model_dir}' not found: a local directory written by save_pretrained "
                       "(config.json, weights, tokenizer, image processor) is expected; nothing is downloaded")
    if not (path / "config.json").is_file():
        raise FerError(f"{KEY}.model_dir: '{model_dir}' has no config.json: not a transformers model directory")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "llava":
        raise FerError(f"{KEY}.model_dir: '{model_dir}' holds a '{model_type}' model; this plugin reads LLaVA-1.5 "
                       "('llava', e.g. llava-hf/llava-1.5-7b-hf)")
    from transformers import AutoTokenizer, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    torch_dtype = _torch_dtype(dtype)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            str(path), dtype=torch_dtype, attn_implementation=attention, local_files_only=True,
            **_quantization(quantization, torch_dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except FerError:
        raise
    except Exception as e:
        raise FerError(f"{KEY}.model_dir: '{model_dir}' could not be loaded ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model, tokenizer, path.resolve()


def build_llava_backbone(*, model_dir: str, mode: str, prompt: str, answers: list[str] | dict[str, str],
                         answer_prefix: str, eos: bool, length_norm: str, dtype: str, attention: str,
                         quantization: str, lora_rank: int, lora_alpha: float, lora_dropout: float,
                         lora_targets: list[str], lora_on: str, train_projector: bool) -> LlavaBackbone:
    if mode == "likelihood" and not answers:
        raise FerError(f"{KEY}.answers: mode 'likelihood' scores one verbalised class name per class: list them "
                       "in the dataset's class order, or as a table {class = \"answer\"}; `fer zeroshot` fills "
                       "in the class names when the list is empty")
    model, tokenizer, path = load_llava(model_dir, dtype=dtype, attention=attention, quantization=quantization)
    model.requires_grad_(False)
    model.config.use_cache = False
    _, projector, _, _ = _parts(model)
    pre = _preprocessing(path, int(model.config.vision_config.image_size))
    lora = None
    net: nn.Module = model
    if lora_rank > 0:
        net = _lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets, lora_on)
        lora = {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout, "targets": list(lora_targets),
                "on": lora_on}
    if train_projector:  # LLaVA's own stage-2 recipe trains the projector fully
        projector.requires_grad_(True)
    names = list(answers) if isinstance(answers, dict) else None
    return LlavaBackbone(net, model_dir=path, tokenizer=tokenizer, pre=pre, mode=mode, prompt=prompt,
                         answers=list(answers.values()) if isinstance(answers, dict) else list(answers),
                         answer_classes=names, answer_prefix=answer_prefix, eos=eos, length_norm=length_norm,
                         attention=attention, lora=lora)

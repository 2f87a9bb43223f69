"""The llava plugin on a tiny random LLaVA-1.5 saved as a local directory, built offline (a small
CLIP vision config, a small Llama config, a word-level tokenizer, a CLIP image processor) and
loaded through the plugin exactly as a user's llava-1.5-7b-hf directory would be."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch

from conftest import FER2013, REPO
from fer_core.api import FerError, eval_transform, get_registry, load_image
from fer_core.model import FerModel

try:
    from builders import make_rafce_tree
except ImportError:  # pragma: no cover
    from tests.builders import make_rafce_tree

REG = get_registry()
FER_CLASSES = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
RAFCE_WORDS = "happily sadly fearfully angrily disgustedly surprised disgusted fearful angry sad"
WORDS = ("USER ASSISTANT Which compound facial expression does this person show ? Answer with one of : , . "
         f"{RAFCE_WORDS} {' '.join(FER_CLASSES)}").split()


def make_tiny_llava(path: Path, seed: int = 0) -> Path:
    """A LLaVA-1.5-shaped model (CLIP tower → 2-layer MLP projector → Llama) with random weights,
    its tokenizer (``<image>`` a special token, BOS prepended) and image processor, saved as
    save_pretrained does for llava-hf/llava-1.5-7b-hf."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, PreTrainedTokenizerFast)

    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(special + WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens=["<image>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
                       initializer_range=0.2)  # logits of a 32-wide model span a few nats, as a real LM's do
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"], vision_feature_layer=-2)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava-1.5")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def build(tiny: Path, **params):
    return REG.build("backbone", {"plugin": "llava", "model_dir": str(tiny), **params}, "model.backbone")


def faces(pre, n_per_class: int = 2, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Real FER2013 faces (the first n of each class in a split), preprocessed for the model."""
    if not (FER2013 / "labels.csv").is_file():
        pytest.skip("../shared/data/fer2013 not present")
    picked: dict[int, list[str]] = {}
    with (FER2013 / "labels.csv").open() as f:
        for row in csv.DictReader(f):
            k = int(row["label_id"])
            if row["split"] == split and len(picked.setdefault(k, [])) < n_per_class:
                picked[k].append(row["path"])
    tf = eval_transform(pre)
    items = [(tf(load_image(FER2013 / p, 3)), k) for k in sorted(picked) for p in picked[k]]
    return torch.stack([x for x, _ in items]), torch.tensor([k for _, k in items])


def fer(*args: str) -> int:
    from fer_core.cli import main

    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


# ---------------------------------------------------------------------- features


@pytest.mark.parametrize("mode, dim", [("vision", 32), ("projected", 32), ("answer", 32), ("likelihood", 7)])
def test_every_mode_gives_batch_by_feature_dim(tiny, mode, dim):
    bb = build(tiny, mode=mode, answers=FER_CLASSES).eval()
    pre = bb.preprocessing
    # the model's own image processor: CLIP's mean/std at the vision tower's size
    assert pre.input_size == (32, 32) and pre.channels == 3 and pre.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert bb.feature_dim == dim and bb.prefers_channels_last is False
    with torch.no_grad():
        f = bb(torch.randn(3, 3, 32, 32))
    assert f.shape == (3, dim) and f.dtype == torch.float32 and torch.isfinite(f).all()


def test_packed_likelihoods_equal_scoring_each_answer_alone(tiny):
    """All answers in one pass (block mask) = the standard forward over prompt + answer, per answer."""
    from transformers import AutoTokenizer

    answers = ["happily surprised", "sadly fearful", "angry"]
    tok = AutoTokenizer.from_pretrained(tiny)
    x = torch.randn(2, 3, 32, 32)
    for eos, norm in ((False, "sum"), (True, "mean")):
        bb = build(tiny, mode="likelihood", answers=answers, eos=eos, length_norm=norm).eval()
        llava, image_id = bb.llava, bb.llava.config.image_token_id
        text = bb.prompt.replace("{answers}", ", ".join(answers))
        with torch.no_grad():
            ll = bb(x)
            for c, a in enumerate(answers):
                ids = tok(text + " " + a)["input_ids"] + ([tok.eos_token_id] if eos else [])
                at = ids.index(image_id)
                ids = ids[:at] + [image_id] * bb.num_image_tokens + ids[at + 1:]
                n = len(bb.answer_ids[c])
                logp = llava(input_ids=torch.tensor([ids] * 2), pixel_values=x).logits.log_softmax(-1)[:, -n - 1:-1]
                alone = logp.gather(2, torch.tensor(ids[-n:])[None, :, None].expand(2, -1, 1))[..., 0].sum(1)
                torch.testing.assert_close(ll[:, c], alone / n if norm == "mean" else alone, atol=1e-5, rtol=1e-5)


def test_answer_mode_is_the_last_hidden_state_after_the_prompt(tiny):
    from transformers import AutoTokenizer

    bb = build(tiny, mode="answer").eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok(bb.prompt.replace("{answers}", ""))["input_ids"]
    image_id = bb.llava.config.image_token_id
    at = ids.index(image_id)
    ids = ids[:at] + [image_id] * bb.num_image_tokens + ids[at + 1:]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = bb.llava.model(input_ids=torch.tensor([ids] * 2), pixel_values=x).last_hidden_state[:, -1]
        torch.testing.assert_close(bb(x), want, atol=1e-5, rtol=1e-5)


def test_zero_shot_probabilities_sum_to_one_over_the_classes(tiny):
    bb = build(tiny, mode="likelihood", answers=FER_CLASSES)
    head = REG.build("head", {"plugin": "answer_scores"}, "model.heads.emotion", bb.feature_dim, len(FER_CLASSES))
    model = FerModel(bb, {"emotion": head}, {"emotion": 7}).eval()
    images, _ = faces(bb.preprocessing, 1)
    with torch.no_grad():
        logits = model(images)["emotion"]
    p = logits.softmax(1)
    assert logits.shape == (7, 7) and (logits <= 0).all()  # log-likelihoods
    torch.testing.assert_close(p.sum(1), torch.ones(7))
    assert sum(x.numel() for x in model.parameters() if x.requires_grad) == 0  # nothing trained


def test_bf16_weights_and_autocast_forward_and_backward(tiny):
    bb = build(tiny, mode="likelihood", answers=FER_CLASSES[:3], dtype="bfloat16", lora_rank=2).train()
    assert next(bb.llava.model.vision_tower.parameters()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ll = bb(torch.randn(2, 3, 32, 32))
    assert ll.dtype == torch.float32 and torch.isfinite(ll).all()
    (-ll[:, 0].mean()).backward()
    assert all(p.grad is not None for p in bb.parameters() if p.requires_grad)


# ---------------------------------------------------------------------- errors


def test_a_missing_or_foreign_directory_is_one_error_naming_the_key(tiny, tmp_path):
    with pytest.raises(FerError, match=r"^model\.backbone\.model_dir: '/nonexistent/llava-1\.5-7b-hf' not found"):
        build(Path("/nonexistent/llava-1.5-7b-hf"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FerError, match=r"^model\.backbone\.model_dir: .* holds a 'llama' model"):
        build(tmp_path)
    with pytest.raises(FerError, match=r"^model\.backbone\.answers: mode 'likelihood' scores one"):
        build(tiny, mode="likelihood")
    with pytest.raises(FerError, match=r"^model\.backbone\.answers: 'sad' is a prefix of 'sad angry'.*eos = true"):
        build(tiny, mode="likelihood", answers=["sad", "sad angry"])
    with pytest.raises(FerError, match=r"^model\.backbone\.prompt: must hold the image token '<image>' exactly once"):
        build(tiny, mode="answer", prompt="USER: no image ASSISTANT:")
    with pytest.raises(FerError, match=r"^model\.backbone\.lora_targets: no module of the language_model is named \['qkv'\]"):
        build(tiny, lora_rank=2, lora_targets=["qkv"])
    with pytest.raises(FerError, match=r"head 'answer_scores' passes one score per class through, but the backbone gives 32"):
        REG.build("head", {"plugin": "answer_scores"}, "model.heads.emotion", 32, 7)


def test_answers_come_from_a_list_a_table_or_the_class_names():
    from fer_plugins.llava.backbone import resolve_answers

    classes = ["Happily surprised", "Sadly angry"]
    assert resolve_answers([], classes) == ["happily surprised", "sadly angry"]
    assert resolve_answers(["joyful surprise", "sad anger"], classes) == ["joyful surprise", "sad anger"]
    assert resolve_answers({"sadly ANGRY": "b", "Happily surprised": "a"}, classes) == ["a", "b"]  # put in class order
    with pytest.raises(FerError, match=r"answers: 1 answers for the dataset's 2 classes"):
        resolve_answers(["x"], classes)
    with pytest.raises(FerError, match=r"missing: \['Sadly angry'\]; not classes of the dataset: \['sad'\]"):
        resolve_answers({"Happily surprised": "a", "sad": "b"}, classes)


# ---------------------------------------------------------------------- LoRA


def test_lora_trains_only_the_adapters_and_the_loss_falls_on_real_faces(tiny):
    torch.manual_seed(0)
    bb = build(tiny, mode="likelihood", answers=FER_CLASSES, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
               lora_on="both")
    bb.set_grad_checkpointing(True)
    trainable = bb.trainable_names()
    assert trainable and all("lora_" in n for n in trainable)
    assert any("vision_tower" in n for n in trainable) and any("language_model" in n for n in trainable)
    head = REG.build("head", {"plugin": "answer_scores"}, "h", 7, 7)
    model = FerModel(bb, {"emotion": head}, {"emotion": 7}).train()
    loss_fn = REG.build("loss", {"plugin": "llava_lm"}, "loss", None)
    opt = REG.build("optimizer", {"plugin": "llava_adamw", "adapter_lr": 0.03, "lr": 0.001},
                    "optimizer", [p for p in model.parameters() if p.requires_grad])
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("adapters", 0.03)]  # no head parameters here
    images, labels = faces(bb.preprocessing, 2)  # 14 real faces, 2 per class
    batch = {"image": images, "label": labels}
    losses = []
    for _ in range(6):
        loss, parts = loss_fn(model(images), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_train_projector_trains_and_saves_the_projector_only(tiny):
    bb = build(tiny, mode="projected", train_projector=True)
    names = bb.trainable_names()
    assert names and all("multi_modal_projector" in n for n in names)
    assert set(bb.state_dict()) == set(names) | {"_extra_state"}
    opt = REG.build("optimizer", {"plugin": "llava_adamw"}, "optimizer", [p for p in bb.parameters() if p.requires_grad])
    assert [g["name"] for g in opt.param_groups] == ["adapters"]


def test_lora_adapters_save_and_reload_to_identical_logits(tiny, tmp_path):
    from safetensors.torch import load_file

    def model():
        torch.manual_seed(1)  # another LoRA init than the trained one: loading must overwrite it
        bb = build(tiny, mode="likelihood", answers=FER_CLASSES, lora_rank=4)
        return FerModel(bb, {"emotion": REG.build("head", {"plugin": "answer_scores"}, "h", 7, 7)}, {"emotion": 7})

    a = model()
    with torch.no_grad():
        for n, p in a.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # "trained" adapters (lora_B starts at zero)
    state = a.state_dict()
    assert set(state) == {f"backbone.{n}" for n in a.backbone.trainable_names()} | {"backbone._extra_state"}
    assert state["backbone._extra_state"]["model_dir"] == str(tiny.resolve())
    torch.save(state, tmp_path / "best.pt")
    frozen = sum(p.numel() for p in a.parameters() if not p.requires_grad)
    saved = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
    assert 0 < saved < frozen / 10
    b = model()
    x = torch.randn(2, 3, 32, 32)
    a.eval(), b.eval()
    with torch.no_grad():
        before = b(x)["emotion"]
        b.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True))  # strict: only adapters in it
        want, got = a(x)["emotion"], b(x)["emotion"]
    assert not torch.equal(before, want)
    assert torch.equal(got, want)

    # the peft export: safetensors adapters + a config that refers to the base directory
    from fer_plugins.llava.components import export_adapters

    out = export_adapters(a.backbone, a.heads, tmp_path / "adapters", FER_CLASSES)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny.resolve()) and cfg["r"] == 4
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == len(a.backbone.trainable_names())
    assert json.loads((out / "fer_llava.json").read_text())["answers"] == FER_CLASSES


# ---------------------------------------------------------------------- the commands, end to end


def test_fer_run_eval_and_zeroshot_end_to_end(tiny, tmp_path, capsys):
    """The shipped RAF-CE recipes, pointed at the tiny model and a RAF-CE tree, through `fer`."""
    root = make_rafce_tree(tmp_path / "RAF-CE", n_per_class=1, size=40)
    common = ["-o", f"data.root={root}", "-o", f"model.backbone.model_dir={tiny}", "-o", "train.device=cpu",
              "-o", "train.precision=fp32", "-o", "tracking.enabled=false", "-o", "train.batch_size=7"]
    for recipe in ("llava_zeroshot_rafce.toml", "llava_lora_rafce.toml"):
        assert fer("recipe", "check", str(REPO / "recipes" / recipe)) == 0

    t0 = time.perf_counter()
    run = tmp_path / "lora"
    assert fer("run", str(REPO / "recipes" / "llava_lora_rafce.toml"), *common, "-o", "train.epochs=1",
               "-o", "model.backbone.lora_rank=2", "--out", str(run)) == 0, capsys.readouterr().err
    m = json.loads((run / "metrics.json").read_text())
    assert m["num_samples"] == 14 and len(m["classes"]) == 14
    best = torch.load(run / "best.pt", weights_only=True)
    assert all("lora_" in k or k == "backbone._extra_state" for k in best["model"])  # adapters only
    assert (run / "adapters" / "adapter_model.safetensors").is_file()  # the llava_adapters callback
    capsys.readouterr()
    assert fer("eval", str(run), "--split", "test", "--json", str(tmp_path / "e.json")) == 0, capsys.readouterr().err
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["split"] == "test" and ev["num_samples"] == 14
    run_s = time.perf_counter() - t0

    zs = tmp_path / "zs"
    assert fer("zeroshot", str(REPO / "recipes" / "llava_zeroshot_rafce.toml"), *common, "--out", str(zs)) == 0, \
        capsys.readouterr().err
    saved = (zs / "recipe.toml").read_text()
    assert '"happily surprised"' in saved  # the answers, filled in from the dataset's class names
    zm = json.loads((zs / "metrics.json").read_text())
    assert zm["zero_shot"] is True and zm["epochs_run"] == 0 and zm["num_samples"] == 14
    assert fer("eval", str(zs), "--json", str(tmp_path / "z.json")) == 0, capsys.readouterr().err
    zev = json.loads((tmp_path / "z.json").read_text())
    assert zev["accuracy"] == pytest.approx(zm["accuracy"]) and zev["confusion_matrix"] == zm["confusion_matrix"]
    assert fer("llava-adapters", str(run), "--out", str(tmp_path / "exported")) == 0
    assert (tmp_path / "exported" / "adapter_config.json").is_file()
    # a zero-shot recipe refuses a non-scoring head, in one line
    capsys.readouterr()
    assert fer("zeroshot", str(REPO / "recipes" / "llava_zeroshot_rafce.toml"), *common,
               "-o", "model.heads.emotion.plugin=linear", "--out", str(tmp_path / "no")) == 2
    assert "`fer zeroshot` scores class names" in capsys.readouterr().err
    print(f"fer run + eval: {run_s:.1f} s")

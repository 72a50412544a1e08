"""What each family gets today, as a user meets it: drafting works where the traced decoder is right,
and everything the export would not reproduce is refused by name, never exported silently wrong."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dream_export.cli import cli
from dream_export.errors import UsageError

try:
    from tests.tiny_vlms import cached_tiny_vlm, tiny_image
except ImportError:  # pytest run without the repository root on sys.path (tests/ is then on it)
    from tiny_vlms import cached_tiny_vlm, tiny_image


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlms")
    return lambda family: cached_tiny_vlm(family, root)


def _refusal(res) -> str:
    """The UsageError message a command stopped with (the console script prints it, exit code 2)."""
    assert isinstance(res.exception, UsageError), res.output
    return str(res.exception)


def _data(tmp_path) -> str:
    rows = []
    for i, (w, h) in enumerate([(40, 30), (33, 57)]):
        tiny_image(w, h, seed=i).save(tmp_path / f"img{i}.png")
        rows.append(json.dumps({"image": f"img{i}.png", "prompt": "What is shown?"}))
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "data.jsonl")


# Drafting reads features from the traced decoder and the HF model's own vision path; the export refuses by
# name what the runtime would not reproduce (here Gemma3's pan-and-scan crops), and writes nothing.
def test_drafting_works_and_export_refuses_by_name(tmp_path, tiny_vlm):
    import shutil

    target = tmp_path / "gemma3"
    shutil.copytree(tiny_vlm("gemma3"), target)
    cfg = target / "processor_config.json"  # transformers 5 saves the image processor's settings in it
    saved = json.loads(cfg.read_text())
    saved["image_processor"]["do_pan_and_scan"] = True
    cfg.write_text(json.dumps(saved))
    runner = CliRunner()
    res = runner.invoke(cli, ["train-draft", str(target), "--data", _data(tmp_path), "-o", str(tmp_path / "draft"),
                              "--steps", "2", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["export", str(target), "--draft", str(tmp_path / "draft"), "-o", str(tmp_path / "b")])
    msg = _refusal(res)
    assert "pan-and-scan" in msg and "Families that export: llava" in msg
    assert not (tmp_path / "b").exists()


def test_qwen_processor_loads_without_torchvision(tiny_vlm):
    """Qwen2.5-VL's processor insists on a torchvision video processor: the images-only one still expands
    <|image_pad|> to the image's merged patches."""
    from dream_export.families import load_processor

    proc = load_processor(tiny_vlm("qwen2_5_vl"))
    enc = proc(text="<|vision_start|><|image_pad|><|vision_end|>What?", images=tiny_image(40, 30),
               return_tensors="pt")
    n_pad = int((enc["input_ids"][0] == proc.image_token_id).sum())
    assert n_pad == int(enc["image_grid_thw"][0].prod()) // proc.image_processor.merge_size ** 2 > 0


def test_pixtral_processor_loads_without_torchvision(tiny_vlm):
    """Mistral3's PixtralProcessor needs torchvision: the same prompt comes from its tokenizer and PIL image
    processor (rows of [IMG] per merged 16-px patch, [IMG_BREAK] between rows, [IMG_END] last)."""
    from dream_export.families import load_processor

    proc = load_processor(tiny_vlm("mistral3"))
    enc = proc(text="[INST][IMG]What is shown?[/INST]", images=tiny_image(40, 30), return_tensors="np")
    assert enc["image_sizes"].tolist() == [[32, 48]]  # 30×40 rounded up to whole 8·2 px merged patches
    text = proc.tokenizer.decode(enc["input_ids"][0])
    assert text.startswith("<s>[INST]" + ("[IMG]" * 3 + "[IMG_BREAK]") + "[IMG]" * 3 + "[IMG_END]What is shown?")


def test_unsupported_family_names_the_supported_ones(tmp_path):
    from transformers import PaliGemmaConfig

    PaliGemmaConfig().save_pretrained(tmp_path / "paligemma")
    res = CliRunner().invoke(cli, ["train-draft", str(tmp_path / "paligemma"), "--data", _data(tmp_path),
                                   "-o", str(tmp_path / "draft")])
    msg = _refusal(res)
    assert "'paligemma'" in msg
    assert all(f in msg for f in ("llava", "llava_next", "idefics3", "gemma3", "mistral3", "qwen2_5_vl"))


def test_placeholder_in_an_answer_is_cut_from_the_draft_data(tmp_path, tiny_vlm):
    """A target that writes its own image placeholder: the data keeps the answer up to it."""
    import torch

    from dream_export.draft.data import DataConfig, FeatureDataset, generate_features
    from dream_export.draft.target import load_target

    target = load_target(tiny_vlm("llava"))
    with torch.no_grad():  # make <image> the target's every next token
        target.model.lm_head.weight[target.vlm.image_token_id] = 0
        target.model.lm_head.bias = torch.nn.Parameter(torch.zeros(target.vlm.facts.vocab_size))
        target.model.lm_head.bias[target.vlm.image_token_id] = 1e4
    from dream_export.core.prompts import read_prompts

    meta = generate_features(target.model, target.processor, read_prompts(_data(tmp_path)), tmp_path / "f",
                             DataConfig(max_new_tokens=4), "x", progress=False)
    assert meta["answers_cut_at_image_placeholder"] == 2
    ds = FeatureDataset(tmp_path / "f")
    assert all(int(s["loss_mask"].sum()) == 0 for s in ds.samples)


def test_readme_support_table_is_the_generated_one():
    from pathlib import Path

    from dream_export.families import EXPORTABLE, SUPPORT, support_table, supported_families

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- support-table:start -->\n")[1].split("\n<!-- support-table:end -->")[0]
    assert block == support_table()
    assert tuple(SUPPORT) == supported_families()
    # test_family_end_to_end covers them all
    assert EXPORTABLE == ("llava", "llava_next", "idefics3", "mistral3", "gemma3", "qwen2_5_vl")

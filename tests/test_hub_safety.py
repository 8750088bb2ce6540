"""Publishing is safe by default and its cards are true (the publishing findings of the hardening pass), against
the loopback stand-in for the Hub (`tests/fake_hub.py`):

- only the files a folder's kind needs go up; a file holding the push token (`token`, `run.sh`, `cache/token`,
  `model/extra/token`, a link to a token file outside the folder) is left out, or, when included, refused with
  the file and line and the token masked, before any request; the dry run lists exactly what would go up and
  fails with the same one-line error and exit status 2 as a real push;
- links out of the folder are never followed; secret-shaped strings are refused in any uploaded file;
- the card says whose VQGAN the folder carries, and recommends (and samples with) the model's own
  `generation_config` defaults, checked against the pipeline's own choice of defaults;
- a training recipe's `push_to_hub: true` publishes through the same checks.
"""

import io
import json
import logging
import os
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
from fake_hub import FakeHub
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from lumina_hf import LuminaMGPTPipeline
from lumina_hf import hub as lhub
from lumina_hf.cli import main
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor

TOKEN = "hf_pushtoken" + "Xy7" * 9
REPO = "test-org/lumina-safe"
TARGET = 64
PIPELINE_FILES = {
    "README.md", "model_index.json", "model/config.json", "model/generation_config.json", "model/model.safetensors",
    "processor/processor_config.json", "processor/tokenizer.json", "processor/tokenizer_config.json",
}
MASKED = TOKEN[:4] + "..."


pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safe") / "pipe"
    LuminaMGPTPipeline(model=build_tiny_model(seed=2), processor=build_tiny_processor(TARGET)).save_pretrained(folder)
    return folder


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def all_bodies(hub: FakeHub) -> bytes:
    return b"".join(r.body for r in hub.requests) + "".join(r.path for r in hub.requests).encode()


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lumina-hf ARGS`."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------ the cases
def _plant_token(folder: Path, outside: Path) -> None:
    (folder / "token").write_text(TOKEN + "\n")


def _plant_run_sh(folder: Path, outside: Path) -> None:
    (folder / "run.sh").write_text(f"#!/bin/sh\nexport HF_TOKEN={TOKEN}\nlumina-hf push . --repo-id {REPO}\n")


def _plant_cache_token(folder: Path, outside: Path) -> None:
    (folder / "cache").mkdir()
    (folder / "cache" / "token").write_text(TOKEN)


def _plant_model_extra_token(folder: Path, outside: Path) -> None:
    (folder / "model" / "extra").mkdir()
    (folder / "model" / "extra" / "token").write_text(f"\n\n{TOKEN}\n")


def _plant_link_out(folder: Path, outside: Path) -> None:
    (outside / "token").write_text(TOKEN)
    os.symlink(outside / "token", folder / "hub_credentials")


# name -> (plant, what is left out without --include, the --include pattern, the refusal it then gets)
CASES = {
    "token": (_plant_token, "token", "token", "token, line 1: holds the Hub token used for this push"),
    "run.sh": (_plant_run_sh, "run.sh", "run.sh", "run.sh, line 2: holds the Hub token used for this push"),
    "cache/token": (_plant_cache_token, "cache/", "cache/*", "cache/token, line 1: holds the Hub token"),
    "model/extra/token": (_plant_model_extra_token, "model/extra/", "model/extra", "model/extra/token, line 3: holds the Hub token"),
    "link out": (_plant_link_out, "hub_credentials", "hub_*", "hub_credentials is a symbolic link that leads outside the folder"),
}


def planted_folder(case, pipeline_dir, tmp_path, monkeypatch):
    """A copy of the pipeline folder with the case's secret planted (a link may point into `tmp_path/outside`), and
    the push token in the environment."""
    folder = copy_of(pipeline_dir, tmp_path / "pipe")
    (tmp_path / "outside").mkdir()
    CASES[case][0](folder, tmp_path / "outside")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_planted_token_is_left_out_of_a_push_and_its_dry_run(case, pipeline_dir, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    _, left_out, _, _ = CASES[case]
    folder = planted_folder(case, pipeline_dir, tmp_path, monkeypatch)
    with FakeHub(TOKEN) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        result = lhub.push_to_hub_folder(folder, REPO, token=TOKEN, endpoint=hub.url)
        assert set(hub.files(REPO)) == PIPELINE_FILES == set(result.files)
        assert TOKEN.encode() not in all_bodies(hub)
        sent = len(hub.requests)
        code, out, err = cli(["push", str(folder), "--repo-id", REPO, "--dry-run"], capsys)
        assert code == 0, err
        assert len(hub.requests) == sent  # the dry run sends nothing
    # the dry run lists what would go up, then what is left out and why
    listed, rest = out.split("\nleft out")[0], out.split("\nleft out")[1].split("\n---\n")[0]
    assert all(f"  {f}  (" in listed for f in PIPELINE_FILES) and f"  {left_out}  (" not in listed
    assert f"  {left_out}  (" in rest
    assert TOKEN not in out + err + caplog.text and str(tmp_path) not in out + caplog.text


@pytest.mark.parametrize("case", list(CASES))
def test_planted_token_included_is_refused_by_push_and_dry_run_alike(case, pipeline_dir, tmp_path, monkeypatch, capsys):
    _, _, pattern, refusal = CASES[case]
    folder = planted_folder(case, pipeline_dir, tmp_path, monkeypatch)
    with FakeHub(TOKEN) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        with pytest.raises(lhub.PublishInputError) as err:
            lhub.push_to_hub_folder(folder, REPO, token=TOKEN, endpoint=hub.url, include=[pattern])
        assert refusal in str(err.value) and TOKEN not in str(err.value)
        if "Hub token" in refusal:
            assert MASKED in str(err.value)
        runs = [cli(["push", str(folder), "--repo-id", REPO, "--include", pattern, *extra], capsys) for extra in (["--dry-run"], [])]
        assert hub.requests == []
    for code, out, err_text in runs:
        assert code == 2 and out == ""
        assert err_text == f"error: {err.value}\n"  # one line, the same for the dry run and the push
        assert TOKEN not in err_text


def test_links_out_of_the_folder_are_never_followed(pipeline_dir, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    (outside / "templates").mkdir(parents=True)
    (outside / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    (outside / "templates" / "x.jinja").write_text("{{ messages }}")
    with FakeHub(TOKEN) as hub:
        # where a needed file should be: refused, whatever it holds
        a = copy_of(pipeline_dir, tmp_path / "a")
        os.symlink(outside / "special_tokens_map.json", a / "processor" / "special_tokens_map.json")
        with pytest.raises(lhub.PublishInputError, match=r"processor/special_tokens_map.json is a symbolic link that leads outside"):
            lhub.push_to_hub_folder(a, REPO, token=TOKEN, endpoint=hub.url)
        b = copy_of(pipeline_dir, tmp_path / "b")
        os.symlink(outside / "templates", b / "processor" / "additional_chat_templates")
        with pytest.raises(lhub.PublishInputError, match=r"processor/additional_chat_templates is a symbolic link"):
            lhub.push_to_hub_folder(b, REPO, token=TOKEN, endpoint=hub.url)
        c = copy_of(pipeline_dir, tmp_path / "c")  # the whole weights folder elsewhere
        shutil.move(c / "model", outside / "model")
        os.symlink(outside / "model", c / "model")
        with pytest.raises(lhub.PublishInputError, match=r"^model is a symbolic link"):
            lhub.push_to_hub_folder(c, REPO, token=TOKEN, endpoint=hub.url)
        assert hub.requests == []
        # a link that stays inside the folder is uploaded with the content it points to
        d = copy_of(pipeline_dir, tmp_path / "d")
        (d / "templates").mkdir()
        (d / "templates" / "chat.jinja").write_text("{{ messages }}\n")
        os.symlink("../templates/chat.jinja", d / "processor" / "chat_template.jinja")
        plan = lhub.prepare_push(d, REPO, token=TOKEN)
        assert "processor/chat_template.jinja" in plan.files and "templates/" in plan.info.left_out
        lhub.upload_plan(plan, token=TOKEN, endpoint=hub.url)
    assert hub.files(REPO)["processor/chat_template.jinja"] == b"{{ messages }}\n"


SECRETS = {
    "Hugging Face token": "hf_" + "A1b2C3d4" * 4 + "xy",
    "GitHub token": "ghp_" + "Z9y8X7w6" * 5,
    "OpenAI-style API key": "sk-proj-" + "q1W2e3R4t5" * 4,
    "AWS access key id": "AKIA" + "ABCDEFGH23456789",
    "Slack token": "xoxb-1234567890-abcdefghij",
    "private key": "-----BEGIN OPENSSH PRIVATE KEY-----",
}


@pytest.mark.parametrize("label", list(SECRETS))
def test_secret_shapes_are_refused_in_any_uploaded_file(label, pipeline_dir, tmp_path):
    folder = copy_of(pipeline_dir, tmp_path / "pipe")
    secret = SECRETS[label]
    # in the recipe copy a training run writes (allow-listed, YAML-scrubbed: the line is the file's own)
    (folder / "training_recipe.yaml").write_text(f"learning_rate: 0.0001\nhub_token: {TOKEN}\nnote: 'key {secret}'\n")
    with pytest.raises(lhub.PublishInputError) as err:
        lhub.prepare_push(folder, REPO, token=TOKEN)
    assert f"training_recipe.yaml, line 3: holds what looks like a {label}" in str(err.value)
    assert secret not in str(err.value) and secret[:4] in str(err.value)
    # in an included file of any name and extension
    (folder / "training_recipe.yaml").unlink()
    (folder / "extras").mkdir()
    (folder / "extras" / "launch.cfg").write_text(f"[auth]\nkey = {secret}\n")
    with pytest.raises(lhub.PublishInputError, match=rf"extras/launch.cfg, line 2: holds what looks like a {label}"):
        lhub.prepare_push(folder, REPO, token=TOKEN, include=["extras/*"])


def test_scrubbed_secret_keys_pass_and_binaries_and_weights_are_scanned(pipeline_dir, tmp_path):
    folder = copy_of(pipeline_dir, tmp_path / "pipe")
    # under a secret key the push token is scrubbed (null), not refused: what a recipe copy usually holds
    (folder / "training_recipe.yaml").write_text(f"learning_rate: 0.0001\nhub_token: {TOKEN}\n")
    plan = lhub.prepare_push(folder, REPO, token=TOKEN)
    recipe = dict(plan.uploads)["training_recipe.yaml"]
    assert TOKEN.encode() not in recipe and b"hub_token: null" in recipe and "training_recipe.yaml" in plan.scrubbed
    # a binary file is scanned byte by byte
    (folder / "blob.dat").write_bytes(b"\x00\x01\x02\x03" + TOKEN.encode() + b"\x00")
    with pytest.raises(lhub.PublishInputError, match=r"blob.dat, byte 4: holds the Hub token"):
        lhub.prepare_push(folder, REPO, token=TOKEN, include=["*.dat"])
    # weights: the safetensors header (names and metadata) is scanned
    weights = folder / "model" / "model.safetensors"
    weights.unlink()
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(weights), metadata={"note": f"pushed with {TOKEN}"})
    (folder / "model" / "config.json").write_text((pipeline_dir / "model" / "config.json").read_text())
    with pytest.raises(lhub.PublishInputError, match=r"model/model.safetensors \(safetensors header\), line 1: holds the Hub token"):
        lhub.prepare_push(folder, REPO, token=TOKEN)


def test_include_patterns(pipeline_dir, tmp_path, monkeypatch, capsys):
    folder = copy_of(pipeline_dir, tmp_path / "pipe")
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("trained on shapes\n")
    (folder / "notes" / "b.md").write_text("# notes\n")
    (folder / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    plan = lhub.prepare_push(folder, REPO, token=TOKEN, include=["notes/*.txt"])
    assert "notes/a.txt" in plan.files and "notes/b.md" not in plan.files and plan.info.included == ["notes/a.txt"]
    assert ".env" in plan.info.left_out and "never published" in plan.info.left_out[".env"]
    assert set(lhub.prepare_push(folder, REPO, token=TOKEN, include=["notes"]).info.included) == {"notes/a.txt", "notes/b.md"}
    for pattern in ("notes/*.csv", ".env"):  # nothing, or only a never-published file: a clear error
        with pytest.raises(lhub.PublishInputError, match="name no file that can be published"):
            lhub.prepare_push(folder, REPO, token=TOKEN, include=[pattern])
    with pytest.raises(lhub.PublishInputError, match="include patterns must be a list"):
        lhub.prepare_push(folder, REPO, token=TOKEN, include="notes/*.txt")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out, _ = cli(["push", str(folder), "--repo-id", REPO, "--include", "notes/*.txt", "--include", "notes/*.md", "--dry-run"], capsys)
    assert code == 0 and "  notes/a.txt  (" in out and "--include)" in out and "  notes/b.md  (" in out and TOKEN not in out


def test_dry_run_needs_the_token_a_push_needs(pipeline_dir, capsys):
    code, out, err = cli(["push", str(pipeline_dir), "--repo-id", REPO, "--dry-run"], capsys)
    assert code == 2 and err.startswith("error: no Hugging Face token") and err.count("\n") == 1


def test_options_dataclass_and_keywords_are_the_same_push(pipeline_dir):
    kw = dict(card_type="finetune", base_model="test-org/base-768", tags=["shapes"], datasets=["test-org/data"], omni=True)
    by_kwargs = lhub.prepare_push(pipeline_dir, REPO, token=TOKEN, **kw)
    by_options = lhub.prepare_push(pipeline_dir, REPO, token=TOKEN, options=lhub.PublishOptions(**kw))
    assert str(by_kwargs.card) == str(by_options.card) and by_kwargs.files == by_options.files
    with pytest.raises(TypeError, match="either options= or keyword arguments"):
        lhub.prepare_push(pipeline_dir, REPO, options=lhub.PublishOptions(), omni=True)
    with pytest.raises(TypeError, match="unknown publishing option"):
        lhub.prepare_push(pipeline_dir, REPO, sample_seed=3)
    with pytest.raises(lhub.PublishInputError, match="card type"):
        lhub.PublishOptions(card_type="lora")


# ------------------------------------------------------------------------------------------ cards that are true
def _meta_shaped_folder(root: Path, codebook: tuple[int, int], vq_config: dict) -> Path:
    """A pipeline folder whose weights hold a VQGAN codebook of `codebook` shape and whose config declares
    `vq_config`, without the rest of a 7B model (only headers are read to describe a folder)."""
    folder = root / f"pipe-{codebook[0]}"
    LuminaMGPTPipeline(model=build_tiny_model(seed=2), processor=build_tiny_processor(TARGET)).save_pretrained(folder)
    cfg = json.loads((folder / "model" / "config.json").read_text())
    cfg["vq_config"] = dict(vq_config, model_type="lumina_mgpt_vqgan")
    (folder / "model" / "config.json").write_text(json.dumps(cfg))
    save_file({"model.vqmodel.quantize.embedding.weight": torch.zeros(codebook, dtype=torch.uint8),
               "lm_head.weight": torch.zeros(4, 4)}, str(folder / "model" / "model.safetensors"))
    return folder


META_VQ = {"embed_dim": 256, "num_embeddings": 8192, "base_channels": 128, "channel_multiplier": [1, 1, 2, 2, 4],
           "latent_channels": 256, "num_res_blocks": 2}
META_SENTENCE = "Meta's Chameleon VQGAN (encoder and decoder, float32) is included"


@pytest.mark.parametrize("card_type", ["base", "finetune"])
def test_card_names_metas_vqgan_only_when_the_folder_holds_it(card_type, tmp_path):
    meta = _meta_shaped_folder(tmp_path, (8192, 256), META_VQ)  # a converted model, or a fine-tune of one
    card = lhub.prepare_push(meta, REPO, token=TOKEN, card_type=card_type).card
    assert META_SENTENCE in card.text
    if card_type == "base":
        assert "and Meta's Chameleon VQGAN with `lumina-hf convert`" in card.text
    # the config alone does not make it Meta's: the weights' codebook must have Meta's shape too
    other = _meta_shaped_folder(tmp_path, (512, 256), META_VQ)
    card = lhub.prepare_push(other, REPO, token=TOKEN, card_type=card_type).card
    assert META_SENTENCE not in card.text and "a VQGAN of its own (512 codes of dimension 256" in card.text
    # nor does a Meta-sized codebook with another architecture
    small = _meta_shaped_folder(tmp_path / "x", (8192, 256), dict(META_VQ, base_channels=64))
    assert META_SENTENCE not in lhub.prepare_push(small, REPO, token=TOKEN, card_type=card_type).card.text


def test_nano_card_is_true_of_the_nano_model():
    """The shipped nano folder (what `examples/nano/build.py export` writes): its own small VQGAN, and its own
    sampling defaults, checked against the pipeline's choice of defaults for it."""
    from lumina_hf.nano import load_nano_pipeline, nano_path

    plan = lhub.prepare_push(nano_path(), "test-org/lumina-mgpt-nano", token=TOKEN, omni=True)
    assert plan.info.left_out == {} and set(plan.files) == {
        "README.md", "model_index.json", "model/config.json", "model/generation_config.json", "model/model.safetensors",
        "processor/processor_config.json", "processor/tokenizer.json", "processor/tokenizer_config.json",
    }
    text = plan.card.text
    assert META_SENTENCE not in text and "a VQGAN of its own (512 codes of dimension 32, downsampling factor 16" in text
    assert "and Meta's Chameleon VQGAN with" not in text
    pipe = load_nano_pipeline()
    t2i = {k: pipe._default(k, None) for k in ("guidance_scale", "image_top_k", "temperature", "num_candidates")}
    omni = {k: pipe._default(k, "segmentation") for k in ("guidance_scale", "image_top_k", "temperature")}
    assert t2i != {"guidance_scale": 4.0, "image_top_k": 2000, "temperature": 1.0, "num_candidates": 1}  # not the reference's
    assert f"| `guidance_scale` | {t2i['guidance_scale']} | {omni['guidance_scale']} |" in text
    assert f"| `top_k` (inside images) | {t2i['image_top_k']} | {omni['image_top_k']} |" in text
    assert f"| `temperature` | {t2i['temperature']} | {omni['temperature']} |" in text
    assert f"| {t2i['num_candidates']} | 1 |" in text
    assert f"num_candidates={t2i['num_candidates']}," in text and "These are this model's own defaults" in text


def test_samples_use_the_models_own_sampling_defaults(tmp_path, monkeypatch):
    model, processor = build_tiny_model(seed=4), build_tiny_processor(TARGET)
    gen = model.generation_config
    gen.guidance_scale, gen.image_top_k, gen.temperature, gen.num_candidates = 1.5, 7, 0.7, 2
    gen.do_sample, gen._from_model_config = True, False
    folder = tmp_path / "tuned"
    LuminaMGPTPipeline(model=model, processor=processor).save_pretrained(folder)
    prompts, seed = ["a red circle", "a blue square"], 5
    with FakeHub(TOKEN) as hub:
        lhub.push_to_hub_folder(folder, REPO, token=TOKEN, endpoint=hub.url, samples=prompts, seed=seed, device="cpu")
    card = ModelCard(hub.files(REPO)["README.md"].decode())
    assert "| `guidance_scale` | 1.5 |" in card.text and "| `top_k` (inside images) | 7 |" in card.text
    assert "| `temperature` | 0.7 |" in card.text and "| 2 |" in card.text
    assert "guidance 1.5, top-k 7, temperature 0.7, best of 2 candidates" in card.text
    # the reference: the pipeline itself, called with no sampling arguments (its defaults for this model)
    pipe = LuminaMGPTPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    grid = np.array(PIL.Image.open(io.BytesIO(hub.files(REPO)["samples/grid.png"])).convert("RGB"))
    for i, prompt in enumerate(prompts):
        ref = pipe(prompt, height=TARGET, width=TARGET, generator=torch.Generator().manual_seed(seed + i)).images[0]
        assert np.array_equal(grid[:, i * TARGET:(i + 1) * TARGET], np.array(ref)), f"sample {i}"


# ------------------------------------------------------------------------------------------ training
def tiny_recipe(output_dir: Path, **overrides) -> dict:
    """Six steps of full fine-tuning of a random tiny model on synthetic items (seconds on a CPU)."""
    return {
        "model_name_or_path": "tiny-random", "tiny_target_size": 32, "dropout": 0.0,
        "dataset_mixture": [{"path": "synthetic:tiny:8", "weight": 1.0}], "target_size": 32, "prompt_room": 128,
        "output_dir": str(output_dir), "max_length": 256, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
        "warmup_ratio": 0.0, "max_steps": 6, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "seed": 42, "disable_tqdm": True, **overrides,
    }


def test_recipe_push_to_hub_goes_through_the_same_checks(tmp_path, monkeypatch, one_thread):
    from lumina_hf.training import parse_recipe, run_recipe

    out = tmp_path / "run"
    # refused before the model loads, nothing written: no repo id, or an adapter whose base is not on the Hub
    for extra, message in (({}, "hub_model_id"), ({"hub_model_id": REPO, "use_peft": True, "save_merged": False}, "base model on the Hub")):
        with pytest.raises(lhub.PublishInputError, match=message):
            run_recipe(parse_recipe(tiny_recipe(out, push_to_hub=True, hub_token=TOKEN, **extra)))
        assert not out.exists()
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "token").write_text(TOKEN)  # something else in the output folder
    with FakeHub(TOKEN) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        recipe = parse_recipe(tiny_recipe(out, push_to_hub=True, hub_model_id=REPO, hub_token=TOKEN, hub_private_repo=True))
        result = run_recipe(recipe)
    files = hub.files(REPO)
    assert result.pipeline_dir == str(out)
    assert set(files) == PIPELINE_FILES | {"training_recipe.yaml"}
    assert TOKEN.encode() not in all_bodies(hub)
    assert b"hub_token: null" in files["training_recipe.yaml"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "lumina-hf" and "## Training details" in card.text
    assert hub.repos[REPO]["private"] is True and [c["files"] for c in hub.repos[REPO]["commits"]][-1] == ["README.md"]

    # a secret the recipe copy carries under an ordinary key is found after training: refused, nothing sent, and
    # the error says the model is saved and how to publish it
    secret = SECRETS["GitHub token"]
    with FakeHub(TOKEN) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        recipe = parse_recipe(tiny_recipe(tmp_path / "run2", push_to_hub=True, hub_model_id=REPO, hub_token=TOKEN, run_name=secret))
        with pytest.raises(lhub.PublishInputError) as err:
            run_recipe(recipe)
        assert hub.requests == []
    msg = str(err.value)
    assert msg.startswith("Training finished and its output is saved") and "training_recipe.yaml, line" in msg
    assert "GitHub token" in msg and secret not in msg and f"lumina-hf push <output folder> --repo-id {REPO}" in msg
    assert (tmp_path / "run2" / "model" / "model.safetensors").is_file()

"""Publishing to the Hub (`lumina_hf.hub`, `lumina-hf push`) against a loopback stand-in for the Hub
(`tests/fake_hub.py`): the files each kind of folder uploads, the model card (metadata parsed back with
huggingface_hub, usage snippet run), loading the published repo back, no token or local path in anything sent
or logged, and bad input (errors before any request; partial uploads reported)."""

import io
import json
import logging
import os
import re
import shutil
import tomllib
from pathlib import Path

import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from fake_hub import FakeHub
from huggingface_hub import ModelCard, ModelCardData

from lumina_hf import LuminaMGPTForConditionalGeneration, LuminaMGPTPipeline
from lumina_hf import hub as lhub
from lumina_hf.image_processing_lumina_mgpt import generate_buckets
from lumina_hf.pipeline_lumina_mgpt import DEFAULTS, OMNI_DEFAULTS
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor

TOKEN = "hf_testtoken" + "Ab3" * 8
REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = 64  # tiny processor bucket family: 64x64 images are 24 decoding steps


# ------------------------------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A pipeline folder, a fine-tuned model folder with training records and leftovers, and a LoRA
    adapter whose config names its local base (as PEFT writes it)."""
    root = tmp_path_factory.mktemp("publish")
    model, processor = build_tiny_model(seed=1), build_tiny_processor(TARGET)
    pipe_dir, model_dir, adapter_dir = root / "pipe", root / "ft-model", root / "adapter"
    LuminaMGPTPipeline(model=model, processor=processor).save_pretrained(root / "pipe-src")
    # re-saved after loading, as users do: model_index.json then names the local source folder
    LuminaMGPTPipeline.from_pretrained(str(root / "pipe-src")).save_pretrained(pipe_dir)
    assert str(root) in (pipe_dir / "model_index.json").read_text()

    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["_name_or_path"] = str(model_dir)  # what older transformers write: a local path
    (model_dir / "config.json").write_text(json.dumps(cfg))
    state = {
        "global_step": 120, "max_steps": 120, "train_batch_size": 8, "best_model_checkpoint": str(model_dir / "checkpoint-100"),
        "log_history": [
            {"step": 10, "epoch": 0.5, "learning_rate": 1e-5, "loss": 6.5},
            {"step": 60, "epoch": 1.0, "learning_rate": 2e-5, "loss": 5.25},
            {"step": 120, "epoch": 2.0, "learning_rate": 2e-5, "loss": 4.75},
            {"step": 120, "epoch": 2.0, "train_loss": 5.5, "train_runtime": 100.0},
        ],
    }
    (model_dir / "trainer_state.json").write_text(json.dumps(state))
    (model_dir / "all_results.json").write_text(json.dumps({"train_samples": 960, "epoch": 2.0}))
    recipe = {
        "model_name_or_path": "test-org/tiny-base-768",
        "dataset_mixer": {"test-org/captions-768": 1.0, str(root / "local_data.json"): 0.5},
        "learning_rate": 2e-5, "lr_scheduler_type": "constant_with_warmup", "num_train_epochs": 2,
        "per_device_train_batch_size": 8, "output_dir": str(model_dir), "hub_token": TOKEN,
    }
    (model_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (model_dir / "checkpoint-100").mkdir()
    (model_dir / "checkpoint-100" / "optimizer.pt").write_bytes(b"\x80pickle")
    (model_dir / "checkpoint-100" / "trainer_state.json").write_text(json.dumps(state))
    (model_dir / "training_args.bin").write_bytes(b"\x80pickle")
    (model_dir / "runs").mkdir()
    (model_dir / "runs" / "events.out.tfevents.1").write_bytes(b"log")

    from peft import LoraConfig, get_peft_model

    base = LuminaMGPTForConditionalGeneration.from_pretrained(str(model_dir))
    peft_model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False))
    peft_model.save_pretrained(adapter_dir)  # also writes PEFT's README.md naming the local base
    return {"root": root, "pipeline": pipe_dir, "model": model_dir, "adapter": adapter_dir, "pipe": LuminaMGPTPipeline(model=model, processor=processor)}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def card_of(hub, repo_id, branch="main") -> ModelCard:
    return ModelCard(hub.files(repo_id, branch)["README.md"].decode())


def python_blocks(card: ModelCard) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card.text, re.S)


def run_snippets(card: ModelCard, substitutions: dict[str, str], cwd: Path, monkeypatch) -> dict:
    """Run the card's python blocks in order, in one namespace, with Hub ids replaced by local folders."""
    blocks = python_blocks(card)
    assert blocks, "the card has no python snippet"
    monkeypatch.chdir(cwd)
    ns: dict = {"__name__": "__card_snippet__"}
    for code in blocks:
        for old, new in substitutions.items():
            if isinstance(new, Path):  # a quoted Hub id -> the local folder
                code = code.replace(f'"{old}"', repr(str(new)))
            else:
                code = code.replace(old, new)
        exec(compile(code, "<card snippet>", "exec"), ns)
    return ns


def assert_nothing_leaked(hub: FakeHub, caplog, local: Path) -> None:
    secret, path = TOKEN.encode(), str(local).encode()
    for req in hub.requests:
        assert secret not in req.body, f"token sent in the body of {req.method} {req.path}"
        assert path not in req.body, f"local path sent in the body of {req.method} {req.path}"
        assert TOKEN not in req.path and str(local) not in req.path
    assert TOKEN not in caplog.text
    assert str(local) not in caplog.text


def assert_common_card(card: ModelCard, *, pipeline_tag: str, base_model: str | None) -> dict:
    data = card.data.to_dict()
    assert isinstance(card.data, ModelCardData)
    assert data["library_name"] == "lumina-hf"
    assert data["pipeline_tag"] == pipeline_tag
    assert data.get("base_model") == base_model
    assert "lumina-mgpt" in data["tags"]
    assert data["license"] == "other" and data["license_name"] == "chameleon-research-license"
    assert data["license_link"].startswith("https://")
    assert "License notice" in card.text and "Chameleon Research License" in card.text
    buckets = ", ".join(f"{w}x{h}" for w, h in generate_buckets(TARGET))
    assert buckets in card.text
    assert "| `guidance_scale` | 4.0 |" in card.text and "| `top_k` (inside images) | 2000 |" in card.text
    assert "| `temperature` | 1.0 |" in card.text
    assert "## Limitations" in card.text
    return data


# ------------------------------------------------------------------------------------------ templates
def test_templates_ship_with_the_package():
    for card_type, name in lhub.TEMPLATE_FILES.items():
        text = lhub.load_template(card_type)
        assert text.startswith("---\n{{ card_data }}\n---")
        assert (REPO_ROOT / "src" / "lumina_hf" / "model_cards" / name).is_file()
        assert name in (REPO_ROOT / "model_cards" / "README.md").read_text()
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lumina_hf"]
    assert "model_cards/*.md" in package_data
    # the card's recommended settings are the pipeline's defaults
    assert lhub.TEXT_TO_IMAGE_SAMPLING["guidance_scale"] == DEFAULTS["guidance_scale"]
    assert lhub.TEXT_TO_IMAGE_SAMPLING["top_k"] == DEFAULTS["image_top_k"]
    assert lhub.TEXT_TO_IMAGE_SAMPLING["temperature"] == DEFAULTS["temperature"]
    assert lhub.OMNI_SAMPLING["guidance_scale"] == OMNI_DEFAULTS["guidance_scale"]
    assert lhub.OMNI_SAMPLING["top_k"] == OMNI_DEFAULTS["image_top_k"]
    from lumina_hf.commands import VERBS

    assert "push" in VERBS


def test_detect_kinds(folders, tmp_path):
    assert [lhub.detect_folder_kind(folders[k]) for k in ("pipeline", "model", "adapter")] == ["pipeline", "model", "adapter"]
    info = lhub.inspect_folder(folders["model"])
    assert info.target_size == TARGET and info.has_vqgan and info.has_processor
    assert "checkpoint-100/" in info.skipped and "training_args.bin" in info.skipped and "runs/" in info.skipped
    assert not any(f.startswith(("checkpoint-", "runs/")) or f.endswith(".bin") for f in info.files)
    t = info.training
    assert (t.global_step, t.learning_rate, t.num_examples, t.recipe_file) == (120, 2e-5, 960, "recipe.yaml")
    assert t.datasets == ["test-org/captions-768"] and t.local_datasets == ["local_data.json"]
    assert str(folders["root"]) not in t.recipe_yaml and TOKEN not in t.recipe_yaml
    # a LoRA run of `lumina-hf train` keeps its records next to `output_dir/adapter/`
    run = tmp_path / "run"
    shutil.copytree(folders["adapter"], run / "adapter", copy_function=os.link)
    (run / "checkpoint-7").mkdir()
    (run / "checkpoint-7" / "trainer_state.json").write_text(json.dumps({"global_step": 7, "log_history": []}))
    adapter = lhub.inspect_folder(run / "adapter")
    assert adapter.training.global_step == 7 and "README.md" not in adapter.files


# ------------------------------------------------------------------------------------------ pipeline
def test_push_pipeline_with_samples(folders, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    repo = "test-org/lumina-mgpt-tiny"
    prompts = [lhub.EXAMPLE_PROMPT, "a blue square"]
    with FakeHub(TOKEN) as hub:
        result = lhub.push_to_hub_folder(
            folders["pipeline"], repo, token=TOKEN, endpoint=hub.url, base_model="Alpha-VLLM/Lumina-mGPT-7B-768",
            samples=prompts, seed=0, device="cpu",
        )
    files = hub.files(repo)
    assert set(files) == {
        "README.md", "model_index.json", "model/config.json", "model/generation_config.json", "model/model.safetensors",
        "processor/processor_config.json", "processor/tokenizer.json", "processor/tokenizer_config.json", "samples/grid.png",
    }
    commits = hub.repos[repo]["commits"]
    assert [c["files"] for c in commits][-1] == ["README.md"] and "README.md" not in commits[0]["files"]
    assert result.kind == "pipeline" and result.card_type == "base" and len(result.commits) == 2
    assert json.loads(files["model_index.json"])["_name_or_path"] == repo  # was the local source folder
    assert all(r.auth_ok for r in hub.requests if not r.path.startswith("/lfs-upload/"))

    card = card_of(hub, repo)
    assert_common_card(card, pipeline_tag="text-to-image", base_model="Alpha-VLLM/Lumina-mGPT-7B-768")
    assert "![samples](samples/grid.png)" in card.text and all(p in card.text for p in prompts) and "seed 0" in card.text

    # the published repo loads back with the same weights
    published = tmp_path / "published"
    hub.write_repo(repo, published)
    loaded = LuminaMGPTPipeline.from_pretrained(str(published))
    assert_same_weights(loaded.model, folders["pipe"].model)

    # the card's usage snippet runs on it (repo id -> the published copy) ...
    ns = run_snippets(card, {repo: published}, tmp_path, monkeypatch)
    assert ns["image"].size == (TARGET, TARGET) and (tmp_path / "lumina_mgpt.png").is_file()
    # ... and gives the first sample of the grid: same prompt, seed and settings as documented
    grid = np.array(PIL.Image.open(io.BytesIO(files["samples/grid.png"])).convert("RGB"))
    assert grid.shape == (TARGET, 2 * TARGET, 3)
    assert np.array_equal(grid[:, :TARGET], np.array(ns["image"]))
    assert not np.array_equal(grid[:, :TARGET], grid[:, TARGET:])
    assert_nothing_leaked(hub, caplog, folders["root"])


# ------------------------------------------------------------------------------------------ fine-tuned model
def test_push_finetuned_model_omni(folders, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    repo = "test-org/lumina-mgpt-tiny-ft"
    with FakeHub(TOKEN) as hub:
        lhub.push_to_hub_folder(folders["model"], repo, token=TOKEN, endpoint=hub.url, omni=True)
    files = hub.files(repo)
    assert set(files) == {
        "README.md", "config.json", "generation_config.json", "model.safetensors", "processor_config.json",
        "tokenizer.json", "tokenizer_config.json", "trainer_state.json", "all_results.json", "recipe.yaml",
    }
    assert json.loads(files["config.json"])["_name_or_path"] == repo
    assert json.loads(files["trainer_state.json"])["best_model_checkpoint"] == "checkpoint-100"
    recipe = yaml.safe_load(files["recipe.yaml"])
    assert recipe["hub_token"] is None and recipe["output_dir"] == "ft-model" and recipe["learning_rate"] == 2e-5

    card = card_of(hub, repo)
    data = assert_common_card(card, pipeline_tag="any-to-any", base_model="test-org/tiny-base-768")
    assert data["datasets"] == ["test-org/captions-768"] and data["base_model_relation"] == "finetune"
    assert "## Training details" in card.text
    for row in ("| Optimizer steps | 120 |", "| Training examples | 960 |", "| Peak learning rate | 2e-05 (constant_with_warmup) |",
                "| Mean training loss | 5.5000 |", "| Recipe | `recipe.yaml` |", "`local_data.json` (local)"):
        assert row in card.text, row
    assert "| `top_k` (inside images) | 2000 | 200 |" in card.text  # Omni column

    published = tmp_path / "published"
    hub.write_repo(repo, published)
    assert_same_weights(LuminaMGPTForConditionalGeneration.from_pretrained(str(published)), folders["pipe"].model)
    # text-to-image, then the Omni tasks (the description shortened to keep the test fast)
    ns = run_snippets(card, {repo: published, "max_new_tokens=64": "max_new_tokens=4"}, tmp_path, monkeypatch)
    assert ns["depth"].size == (TARGET, TARGET) and isinstance(ns["caption"], str)
    assert_nothing_leaked(hub, caplog, folders["root"])


# ------------------------------------------------------------------------------------------ adapter
def test_push_adapter_as_pull_request(folders, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    repo, base_id = "test-org/lumina-mgpt-tiny-lora", "test-org/tiny-base-64"
    with FakeHub(TOKEN) as hub:
        # its config names a local base: the Hub id must be given, before anything is sent
        with pytest.raises(lhub.PublishInputError, match="base model"):
            lhub.push_to_hub_folder(folders["adapter"], repo, token=TOKEN, endpoint=hub.url)
        assert hub.requests == []
        result = lhub.push_to_hub_folder(folders["adapter"], repo, token=TOKEN, endpoint=hub.url, base_model=base_id, create_pr=True)
    assert result.pr_url.endswith("/discussions/1")
    assert hub.files(repo, "main") == {}  # both commits went to the pull request
    files = hub.files(repo, "refs/pr/1")
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == base_id

    card = card_of(hub, repo, "refs/pr/1")  # ours, not PEFT's
    data = assert_common_card(card, pipeline_tag="text-to-image", base_model=base_id)
    assert {"lora", "peft"} <= set(data["tags"]) and data["base_model_relation"] == "adapter"
    assert "LoRA rank 4, alpha 8" in card.text

    published = tmp_path / "published"
    hub.write_repo(repo, published, "refs/pr/1")
    ns = run_snippets(card, {repo: published, base_id: folders["model"]}, tmp_path, monkeypatch)
    from peft import PeftModel

    reference = PeftModel.from_pretrained(
        LuminaMGPTForConditionalGeneration.from_pretrained(str(folders["model"])), str(folders["adapter"])
    ).merge_and_unload()
    assert_same_weights(ns["model"], reference)
    assert ns["image"].size == (TARGET, TARGET)
    assert_nothing_leaked(hub, caplog, folders["root"])


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_fails_before_any_request(folders, tmp_path):
    def push(folder, repo="test-org/x", **kw):
        return lhub.push_to_hub_folder(folder, repo, token=kw.pop("token", TOKEN), endpoint=hub.url, **kw)

    with FakeHub(TOKEN) as hub:
        for bad in ("no-namespace", "a/b/c", "org/bad name", "org/x--y", "-org/x"):
            with pytest.raises(lhub.PublishInputError, match="repo id"):
                push(folders["pipeline"], bad)
        empty = tmp_path / "empty"
        empty.mkdir()
        with pytest.raises(lhub.PublishInputError, match="not a lumina_hf folder"):
            push(empty)
        with pytest.raises(lhub.PublishInputError, match="is not a folder"):
            push(tmp_path / "missing")
        other = tmp_path / "llama"
        other.mkdir()
        (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
        with pytest.raises(lhub.PublishInputError, match="not 'lumina_mgpt'"):
            push(other)
        (other / "config.json").write_text(json.dumps({"model_type": "chameleon"}))
        with pytest.raises(lhub.PublishInputError, match="lumina-hf convert"):
            push(other)

        # missing or broken weights
        no_weights = tmp_path / "no-weights"
        shutil.copytree(folders["pipeline"], no_weights, copy_function=os.link)
        (no_weights / "model" / "model.safetensors").unlink()
        with pytest.raises(lhub.PublishInputError, match="no model weights in model/"):
            push(no_weights)
        (no_weights / "model" / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
        )
        with pytest.raises(lhub.PublishInputError, match="2 are missing"):
            push(no_weights)
        truncated = tmp_path / "truncated"
        shutil.copytree(folders["model"], truncated, ignore=shutil.ignore_patterns("model.safetensors"), copy_function=os.link)
        (truncated / "model.safetensors").write_bytes((folders["model"] / "model.safetensors").read_bytes()[:100_000])
        with pytest.raises(lhub.PublishInputError, match="not a complete safetensors|truncated"):
            push(truncated)
        no_proc = tmp_path / "no-processor"
        shutil.copytree(folders["model"], no_proc, ignore=shutil.ignore_patterns("tokenizer*", "processor_config.json"), copy_function=os.link)
        with pytest.raises(lhub.PublishInputError, match="no processor"):
            push(no_proc)
        adapter = tmp_path / "adapter"
        shutil.copytree(folders["adapter"], adapter, ignore=shutil.ignore_patterns("*.safetensors"), copy_function=os.link)
        with pytest.raises(lhub.PublishInputError, match="adapter_model.safetensors"):
            push(adapter, base_model="test-org/base")

        # a secret that is not under a known key is refused, not silently uploaded (notes.txt is not a file a
        # model folder needs: it goes up only when included, and is scanned then)
        leaky = tmp_path / "leaky"
        shutil.copytree(folders["model"], leaky, ignore=shutil.ignore_patterns("checkpoint-*", "runs"), copy_function=os.link)
        (leaky / "notes.txt").write_text(f"login with {TOKEN}\n")
        with pytest.raises(lhub.PublishInputError, match="token"):
            push(leaky, include=["notes.txt"])
        with pytest.raises(lhub.PublishInputError, match="no Hugging Face token"):
            push(folders["adapter"], token=None, base_model="test-org/base")
        assert hub.requests == []


def test_failed_commits_say_what_went_through(folders):
    repo = "test-org/lumina-lora-fail"
    kw = dict(token=TOKEN, base_model="test-org/tiny-base-64")
    with FakeHub(TOKEN, fail_commits={1: 500}) as hub:
        with pytest.raises(lhub.PushError) as err:
            lhub.push_to_hub_folder(folders["adapter"], repo, endpoint=hub.url, **kw)
    msg = str(err.value)
    assert "failed at commit 1 of 2" in msg and "Nothing was committed" in msg and "500" in msg
    assert err.value.committed == [] and set(err.value.not_committed) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert hub.files(repo) == {} and TOKEN not in msg

    with FakeHub(TOKEN, fail_commits={2: 500}) as hub:
        with pytest.raises(lhub.PushError) as err:
            lhub.push_to_hub_folder(folders["adapter"], repo, endpoint=hub.url, **kw)
    msg = str(err.value)
    assert "failed at commit 2 of 2" in msg and "Committed (on the Hub now): commit 1" in msg
    assert "adapter_model.safetensors" in msg.split("Not committed")[0] and msg.split("Not committed")[1].startswith(": README.md")
    assert err.value.not_committed == ["README.md"] and len(err.value.committed) == 1
    assert set(hub.files(repo)) == {"adapter_config.json", "adapter_model.safetensors"}


# ------------------------------------------------------------------------------------------ CLI
def test_cli_push(folders, monkeypatch, capsys):
    from lumina_hf.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo = "test-org/lumina-cli"
    with FakeHub(TOKEN) as hub:
        # huggingface_hub reads HF_ENDPOINT once, at import, into constants.ENDPOINT (HfApi's default)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        assert main(["push", str(folders["adapter"]), "--repo-id", repo, "--base-model", "test-org/tiny-base-64", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "adapter_model.safetensors" in out and "library_name: lumina-hf" in out and hub.requests == []
        with pytest.raises(SystemExit, match="error: .*repo id"):
            main(["push", str(folders["adapter"]), "--repo-id", "not a repo"])
        code = main([
            "push", str(folders["adapter"]), "--repo-id", repo, "--base-model", "test-org/tiny-base-64", "--private",
            "--revision", "dev", "--commit-message", "Add my adapter", "--dataset", "test-org/captions-768",
        ])
    assert code == 0
    assert hub.repos[repo]["private"] is True
    assert set(hub.files(repo, "dev")) == {"README.md", "adapter_config.json", "adapter_model.safetensors"} and hub.files(repo) == {}
    assert [c["summary"] for c in hub.repos[repo]["commits"]] == ["Add my adapter", "Add my adapter (model card)"]
    assert card_of(hub, repo, "dev").data.datasets == ["test-org/captions-768"]
    assert capsys.readouterr().out.count("/commit/") == 2

"""Bad pipeline arguments are refused before any forward pass, with a ValueError naming the argument: the findings of
an adversarial pass (NaN/inf sampling values, sizes as strings or floats, fractional counts, non-generator
generators, empty or non-string prompts, NaN images, an image without a task), a model whose generation_config holds
a wrong value, and a property-based sweep over wrong types and out-of-range values."""

import logging
import math

import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lumina_hf import LuminaMGPTPipeline
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    p = LuminaMGPTPipeline(model=build_tiny_model(seed=5), processor=build_tiny_processor(64))
    p.set_progress_bar_config(disable=True)
    return p


def refused(pipe, match=None, **kwargs):
    calls = []
    hook = pipe.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match) as info:
            pipe(**kwargs)
    finally:
        hook.remove()
    assert calls == [], "a forward ran before the argument was refused"
    return str(info.value)


IMAGE = PIL.Image.new("RGB", (64, 64), "red")
NAN_IMAGE = torch.full((3, 64, 64), float("nan"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt="a", temperature=float("nan")), "temperature must be a finite number"),
        (dict(prompt="a", temperature=float("inf")), "temperature must be a finite number"),
        (dict(prompt="a", guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(prompt="a", guidance_scale=float("inf")), "guidance_scale must be a finite number"),
        (dict(prompt="a", height="64", width=64), "height must be an integer"),
        (dict(prompt="a", height=64.0, width=64), "height must be an integer"),
        (dict(prompt="a", num_images_per_prompt=2.5), "num_images_per_prompt must be an integer"),
        (dict(prompt="a", generator=0), "generator must be a torch.Generator"),
        (dict(prompt=[]), "prompt is an empty list"),
        (dict(prompt=[None]), r"prompt\[0\] must be a string"),
        (dict(prompt=[1, 2]), r"prompt\[0\] must be a string"),
        (dict(prompt="   "), r"prompt\[0\] is empty"),
        (dict(image=NAN_IMAGE, task="depth"), "NaN or infinite"),
        (dict(prompt="a", image=IMAGE), "without a task"),
        (dict(prompt="a", max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_findings_are_refused_before_any_forward(pipe, kwargs, match):
    refused(pipe, match, **kwargs)


def test_negative_prompt_without_guidance_warns(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="lumina_hf"):
        pipe("a", negative_prompt="blurry", guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert any("negative_prompt is ignored" in r.message for r in caplog.records)


def test_invalid_generation_config_value_is_named(pipe):
    pipe.model.generation_config.num_candidates = "eight"
    try:
        message = refused(pipe, "generation_config", prompt="a")
        assert "num_candidates" in message and "eight" in message
    finally:
        pipe.model.generation_config.num_candidates = None


BAD_VALUES = st.one_of(
    st.none(), st.booleans(), st.text(max_size=3), st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=0), st.lists(st.integers(), max_size=2), st.just(object()),
)
# argument -> the values it accepts (anything else drawn from BAD_VALUES must be refused)
ACCEPTS = {
    "num_images_per_prompt": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    # math.isfinite: np.isfinite raises TypeError on Python ints beyond int64, which the strategy draws
    "guidance_scale": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0),
    "temperature": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0),
    "top_k": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "num_candidates": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "generator": lambda v: v is None,
    "prompt": lambda v: isinstance(v, str) and v.strip() != "",
    "max_new_tokens": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(ACCEPTS)), value=BAD_VALUES)
def test_any_wrong_value_is_a_value_error_before_the_first_forward(pipe, name, value):
    if ACCEPTS[name](value):
        return  # an acceptable value: nothing to refuse
    kwargs = {"prompt": "a", "height": 64, "width": 64, "output_type": "latent", name: value}
    calls = []
    hook = pipe.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises((ValueError, TypeError)):
            pipe(**kwargs)
    finally:
        hook.remove()
    assert calls == []

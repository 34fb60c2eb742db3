"""The reward plugins ``aesthetic`` and ``preference`` (losses/_reward.py, _aesthetic.py,
_preference.py), beyond the shared contract of test_plugin_contract.py:

- the score is the float64 reference computed by hand from the same tiny weights (transformers'
  forward, LAION's head and PickScore's formula written out), and the loss is its negation;
- the gradient in x passes ``torch.autograd.gradcheck`` (central differences in float64), through
  the resize, the crop and the grayscale → RGB path;
- the images are preprocessed as transformers' CLIP image processor does (compared on fixed
  images, the tolerance derived below);
- configuration: a missing directory or head is an error naming the flag, an unset flag hides the
  plugin, a wrong ``prompt`` is INVALID_ARGUMENT; the flags reach the plugins' settings.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _needs import missing
import torch

from adjointdpm_server.errors import FailedPrecondition, InvalidArgument
from adjointdpm_server.losses import LossContext, available_losses, build_loss
from adjointdpm_server.losses._reward import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipPreprocess
from tests.losses.tiny_rewards import IMAGE_SIZE, PROCESSOR, build_tiny_aesthetic, build_tiny_preference

F64 = torch.float64
PROMPTS = ["a photo of a cat", "a dog", "a painting in the style of a cat"]


@pytest.fixture(scope="module")
def aesthetic_dir(tmp_path_factory):
    return build_tiny_aesthetic(tmp_path_factory.mktemp("aesthetic"))


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory):
    return build_tiny_preference(tmp_path_factory.mktemp("preference"))


def aesthetic(directory):
    return build_loss("aesthetic", LossContext(None, {"aesthetic_model_dir": str(directory)}), {})


def preference(directory, prompt):
    return build_loss("preference", LossContext(None, {"preference_model_dir": str(directory)}),
                      {"prompt": prompt})


def images(seed: int, *shape: int) -> torch.Tensor:
    """Images in [0.1, 0.9] (float64): a finite-difference step stays inside [0, 1]."""
    return 0.1 + 0.8 * torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def normalized_by_hand(x: torch.Tensor) -> torch.Tensor:
    """What CLIP's processor does to an image already at the model's size: (x − mean) / std."""
    mean = torch.tensor(PROCESSOR["image_mean"], dtype=F64).view(1, 3, 1, 1)
    std = torch.tensor(PROCESSOR["image_std"], dtype=F64).view(1, 3, 1, 1)
    return (x - mean) / std


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


# ---- the score: the float64 reference, by hand ---------------------------------------------------

def aesthetic_reference(directory, x: torch.Tensor) -> torch.Tensor:
    """transformers' CLIP vision tower + projection in float64, L2-normalised, then LAION's head
    written out: five affine maps (layers 0, 2, 4, 6, 7; dropout is the identity at inference)."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection.from_pretrained(directory).to(F64).eval()
    with torch.no_grad():
        h = unit(vision(pixel_values=normalized_by_hand(x)).image_embeds)
    w = {k: v.to(F64) for k, v in load_file(directory / "head.safetensors").items()}
    for i in (0, 2, 4, 6, 7):
        h = h @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
    return h[:, 0]


def test_aesthetic_score_is_the_float64_reference(aesthetic_dir):
    x = images(1, 3, 3, IMAGE_SIZE, IMAGE_SIZE)  # at the model's size: the processor only normalises
    expected = aesthetic_reference(aesthetic_dir, x)
    assert expected.unique().numel() == 3, "the tiny weights score the three images alike"
    plugin = aesthetic(aesthetic_dir)
    score = plugin.reward(x)
    assert score.dtype == F64
    torch.testing.assert_close(score, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plugin(x), -expected, rtol=1e-12, atol=1e-12)  # loss = −reward


def test_aesthetic_reads_a_whole_clip_directory_too(tmp_path, aesthetic_dir):
    """A CLIPModel directory (LAION's predictor sits on openai's full CLIP) gives the same score as
    its vision tower and projection saved alone."""
    full = build_tiny_aesthetic(tmp_path / "full", full=True)
    assert (full / "vocab.json").exists() and "text_config" in json.loads((full / "config.json").read_text())
    x = images(2, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(aesthetic(full).reward(x), aesthetic(aesthetic_dir).reward(x),
                               rtol=1e-12, atol=1e-12)


def test_aesthetic_head_is_laions_architecture():
    from adjointdpm_server.losses._aesthetic import AestheticHead

    head = AestheticHead(768)
    kinds = [(type(m).__name__, getattr(m, "in_features", getattr(m, "p", None)),
              getattr(m, "out_features", None)) for m in head.layers]
    assert kinds == [("Linear", 768, 1024), ("Dropout", 0.2, None), ("Linear", 1024, 128),
                     ("Dropout", 0.2, None), ("Linear", 128, 64), ("Dropout", 0.1, None),
                     ("Linear", 64, 16), ("Linear", 16, 1)]
    # LAION's state-dict keys, so its released weights load as they are
    assert sorted(head.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7)
                                               for p in ("weight", "bias"))


def test_preference_score_is_pickscore_in_float64(preference_dir):
    """PickScore: ``model.logit_scale.exp() * text_embs @ image_embs.T`` on normalised embeddings,
    its prompts tokenized as PickScore's processor call does (padding to the longest, mask)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(preference_dir).to(F64).eval()
    tokenizer = CLIPTokenizer.from_pretrained(preference_dir)
    x = images(3, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        inputs = tokenizer(PROMPTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
        text = model.get_text_features(**inputs)
        text = unit(getattr(text, "pooler_output", text))
        image = model.get_image_features(pixel_values=normalized_by_hand(x))
        image = unit(getattr(image, "pooler_output", image))
        table = model.logit_scale.exp() * text @ image.T  # [prompt, image]
    assert model.logit_scale.exp().item() == pytest.approx(np.exp(2.0))  # not the default 1/0.07
    # one prompt per sample: the diagonal; one prompt for all: its row
    per_sample = preference(preference_dir, PROMPTS)
    torch.testing.assert_close(per_sample.reward(x), table.diagonal(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_sample(x), -table.diagonal(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(preference(preference_dir, PROMPTS[1]).reward(x), table[1],
                               rtol=1e-12, atol=1e-12)


def test_the_loss_is_minus_the_reward_and_descending_it_raises_the_reward(aesthetic_dir, preference_dir):
    for plugin in (aesthetic(aesthetic_dir), preference(preference_dir, PROMPTS[0])):
        assert "loss = −score" in plugin.description
        x = images(4, 2, 3, IMAGE_SIZE, IMAGE_SIZE).requires_grad_()
        loss = plugin(x)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        with torch.no_grad():
            before, after = plugin.reward(x), plugin.reward(x - 1e-2 * grad / grad.norm())
        assert (after > before).all(), f"{plugin.name}: a step down the loss lowered the reward"


# ---- the gradient: gradcheck in float64, through resize, crop and grayscale -----------------------

SHAPES = [(2, 3, IMAGE_SIZE, IMAGE_SIZE),  # normalisation only
          (2, 3, 10, 13),                  # upsampled: shortest edge 10 → 16, 13 → 20, centre-cropped
          (1, 3, 21, 18),                  # downsampled (antialiased): 18 → 16, 21 → 18, cropped
          (1, 1, 8, 8)]                    # the digits' grayscale images: L → RGB, upsampled


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["aesthetic", "preference"])
def test_gradient_passes_gradcheck_in_float64(name, shape, aesthetic_dir, preference_dir):
    plugin = aesthetic(aesthetic_dir) if name == "aesthetic" else preference(preference_dir, PROMPTS[0])
    x = images(5, *shape).requires_grad_()
    out = plugin(x)
    assert out.dtype == F64 and out.shape == (shape[0],)
    assert torch.autograd.gradcheck(plugin, (x,), eps=1e-6, atol=1e-9, rtol=1e-6)


# ---- preprocessing: CLIP's image processor, in torch ---------------------------------------------

def processors():
    """transformers' CLIP image processors that run here: the PIL one always; the default
    (torchvision) ``CLIPImageProcessor`` where torchvision is installed."""
    import transformers

    found = []
    for name in ("CLIPImageProcessor", "CLIPImageProcessorPil"):
        try:
            cls = getattr(transformers, name)
            cls()
        except (ImportError, AttributeError):
            continue
        found.append(name)
    return found


PROCESSOR_CLASSES = processors()
# The PIL processor resizes 8-bit images in two separable passes, rounding to an integer after
# each: ≤ 0.5/255 from the second pass, and ≤ 0.5/255 · Σ|w| ≤ 0.625/255 from the first carried
# through the second pass's weights (bicubic a = −0.5: Σ|w| ≤ 1.25). Together ≤ 1.125/255 in
# [0, 1], which normalisation divides by std (≥ 0.2613): ≤ 0.0169. Images drawn in [64, 192] stay
# inside [0, 255] after both passes' overshoot (≤ 1.25² of the range), so PIL never clips. Without
# a resize the processor and we differ only by float32 rounding.
TOLERANCE = 1.125 / 255 / min(OPENAI_CLIP_STD)


def fixed_image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height * 100 + width).integers(64, 193, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("cls", PROCESSOR_CLASSES or ["none"])
@pytest.mark.parametrize("hw", [(16, 16), (37, 29), (9, 12), (16, 40), (50, 50)], ids=str)
def test_preprocessing_is_clips_image_processor(cls, hw, preference_dir):
    import transformers
    from PIL import Image

    if not PROCESSOR_CLASSES:  # transformers' PIL processor ships with adjointdpm-server's dependencies
        missing("transformers' CLIPImageProcessor (adjointdpm-server's dependency)")
    processor = getattr(transformers, cls).from_pretrained(preference_dir)
    image = fixed_image(*hw)
    expected = processor(images=Image.fromarray(image), return_tensors="pt").pixel_values.to(F64)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(F64) / 255
    ours = ClipPreprocess.from_dir(preference_dir, IMAGE_SIZE, "--flag")(x)
    assert ours.shape == expected.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    error = (ours - expected).abs().max().item()
    assert error <= (1e-6 if hw == (16, 16) else TOLERANCE), f"{hw}: max |ours − processor| = {error:.4g}"

    # the tolerance has teeth: the usual shortcuts miss by more than twice it
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=F64).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=F64).view(1, 3, 1, 1)
    assert (ours * std + mean - expected).abs().max() > 2 * TOLERANCE  # no normalisation
    if hw == (16, 16):
        return
    square = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic",
                                             align_corners=False)  # clip_similarity's: no crop, a = −0.75
    assert ((square - mean) / std - expected).abs().max() > 2 * TOLERANCE
    size = ClipPreprocess.from_dir(preference_dir, IMAGE_SIZE, "--flag").resized(*hw)
    if size != hw:  # torch's bicubic without antialias (a = −0.75, no widened filter), cropped alike
        plain = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False)
        top, left = (size[0] - IMAGE_SIZE) // 2, (size[1] - IMAGE_SIZE) // 2
        plain = plain[..., top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
        assert ((plain - mean) / std - expected).abs().max() > 2 * TOLERANCE


@pytest.mark.parametrize("hw", [(37, 29), (9, 12), (50, 50)], ids=str)
def test_the_resize_is_pils_filter_without_the_rounding(hw):
    """What the 8-bit tolerance above leaves out: resized in floating point (PIL's mode "F", one
    channel at a time) PIL and the torch resize + crop agree to float32 rounding, so the
    processor's residual is its 8-bit rounding alone."""
    from PIL import Image

    image = fixed_image(*hw).astype(np.float32) / 255
    unnormalized = ClipPreprocess(IMAGE_SIZE, (IMAGE_SIZE, IMAGE_SIZE), None, None)
    size = unnormalized.resized(*hw)
    top, left = (size[0] - IMAGE_SIZE) // 2, (size[1] - IMAGE_SIZE) // 2
    pil = np.stack([np.asarray(Image.fromarray(image[..., c], mode="F").resize(
        (size[1], size[0]), Image.Resampling.BICUBIC)) for c in range(3)])
    pil = torch.from_numpy(pil[:, top:top + IMAGE_SIZE, left:left + IMAGE_SIZE].copy()).to(F64)
    ours = unnormalized(torch.from_numpy(image).permute(2, 0, 1)[None].to(F64))[0]
    torch.testing.assert_close(ours, pil, rtol=0, atol=1e-5)


def test_preprocessing_follows_the_processor_config(tmp_path):
    """Without preprocessor_config.json: the processor's defaults at the model's image size;
    with one: its size, crop, mean and std (here a square resize, no crop, other statistics)."""
    default = ClipPreprocess.from_dir(tmp_path, 24, "--flag")
    assert (default.size, default.crop, default.mean, default.std, default.mode) == \
        (24, (24, 24), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")
    assert default.resized(30, 60) == (24, 48) and default.resized(61, 30) == (48, 24)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        **PROCESSOR, "size": {"height": 16, "width": 16}, "do_center_crop": False, "resample": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    custom = ClipPreprocess.from_dir(tmp_path, 16, "--flag")
    assert (custom.size, custom.crop, custom.mean, custom.mode) == ((16, 16), None, (0.5,) * 3, "bilinear")
    x = images(6, 1, 3, 8, 32)
    assert custom(x).shape == (1, 3, 16, 16)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**PROCESSOR, "crop_size": 20}))
    with pytest.raises(FailedPrecondition, match="--flag"):
        ClipPreprocess.from_dir(tmp_path, 16, "--flag")


# ---- configuration ---------------------------------------------------------------------------------

PLUGINS = [("aesthetic", "aesthetic_model_dir", "--aesthetic-model-dir", {}),
           ("preference", "preference_model_dir", "--preference-model-dir", {"prompt": "a cat"})]


@pytest.mark.parametrize("name,key,flag,params", PLUGINS, ids=[p[0] for p in PLUGINS])
def test_a_missing_directory_is_an_error_naming_the_flag(name, key, flag, params, tmp_path):
    # a path that is not there, and a hub id (never fetched: only local directories are read)
    for directory in (tmp_path / "absent", "openai/clip-vit-large-patch14"):
        with pytest.raises(FailedPrecondition, match=flag) as err:
            build_loss(name, LossContext(None, {key: str(directory)}), params)
        assert str(directory) in str(err.value) and err.value.code == "FAILED_PRECONDITION"


@pytest.mark.parametrize("name,key,flag,params", PLUGINS, ids=[p[0] for p in PLUGINS])
def test_an_unset_flag_hides_the_plugin(name, key, flag, params):
    assert name not in available_losses({key: None})
    with pytest.raises(InvalidArgument, match=f"unknown loss '{name}'"):
        build_loss(name, LossContext(None, {}), params)


def test_an_aesthetic_directory_without_its_head_is_an_error_naming_flag_and_file(tmp_path, aesthetic_dir):
    import shutil

    for missing in ("head.safetensors", "head_config.json"):
        broken = tmp_path / missing
        shutil.copytree(aesthetic_dir, broken)
        (broken / missing).unlink()
        with pytest.raises(FailedPrecondition, match=f"--aesthetic-model-dir .* has no {missing}"):
            aesthetic(broken)
    wrong = tmp_path / "wrong-dim"
    shutil.copytree(aesthetic_dir, wrong)
    (wrong / "head_config.json").write_text(json.dumps({"input_dim": 768}))
    with pytest.raises(FailedPrecondition, match="input_dim 768.*projection_dim is 16"):
        aesthetic(wrong)


@pytest.mark.parametrize("prompt", [None, 3, True, "", [], ["a cat", 2], [""], {"text": "a cat"}],
                         ids=repr)
def test_a_wrong_prompt_is_invalid_argument(prompt, preference_dir):
    params = {} if prompt is None else {"prompt": prompt}
    with pytest.raises(InvalidArgument, match="'prompt'") as err:
        build_loss("preference", LossContext(None, {"preference_model_dir": str(preference_dir)}), params)
    assert err.value.code == "INVALID_ARGUMENT"


def test_prompts_must_match_the_batch(preference_dir):
    plugin = preference(preference_dir, PROMPTS[:2])
    with pytest.raises(InvalidArgument, match="2 prompts for a batch of 3"):
        plugin(images(7, 3, 3, IMAGE_SIZE, IMAGE_SIZE))


def test_the_flags_reach_the_plugins_settings():
    from adjointdpm_server.__main__ import parse_args

    config, _ = parse_args(["--aesthetic-model-dir", "/models/aesthetic",
                            "--preference-model-dir", "/models/pickscore"])
    settings = config.loss_settings()
    assert settings["aesthetic_model_dir"] == "/models/aesthetic"
    assert settings["preference_model_dir"] == "/models/pickscore"
    unset = parse_args([])[0].loss_settings()
    assert unset["aesthetic_model_dir"] is None and unset["preference_model_dir"] is None
    assert not {"aesthetic", "preference"} & set(available_losses(unset))

"""The NNX CLIP (both towers, projections) against transformers' CLIPModel and OpenAI's CLIP (`clip/model.py` of the
openai-clip package) on tiny random weights; the loaders (HF folder, OpenAI TorchScript .pt); CLIPScorer and
clipsim end to end; bad inputs."""

import importlib.util

import jax
import numpy as np
import pytest
import torch

from lavie_jax.convert.clip import CLIPLoadError, load_clip, openai_to_transformers
from lavie_jax.evaluation.clipsim import CLIPScorer, CLIPSIMInputError, clipsim
from lavie_jax.io.text import default_tokenizer, tokenize
from lavie_jax.models.clip_vision import preprocess_frames
from tests.models.tiny_configs import rel_err

transformers = pytest.importorskip("transformers")

VOCAB = 49408  # the real BPE, so the real tokenizer works end to end
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": VOCAB, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
VISION = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 32, "patch_size": 8}
CAPTIONS = ["a red square moves left", "a blue circle grows", "two dogs playing in the snow near a tree"]


def _openai_module():
    """openai-clip's `clip/model.py` (its package __init__ needs pkg_resources, which is gone from setuptools)."""
    folder = importlib.util.find_spec("clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("openai_clip_model", f"{folder}/model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """(folder, torch CLIPModel) of a tiny random CLIPModel saved with save_pretrained, tokenizer files included."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("clip_hf")
    model.save_pretrained(folder)
    default_tokenizer().save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def scorer(hf_folder):
    """One CLIPScorer (batch 2) for the tests below: its programs compile once."""
    return CLIPScorer(hf_folder[0], batch_size=2)


def _frames(n, h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.uint8)


def _ids(tokenizer_ids: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(tokenizer_ids.astype(np.int64))


def test_parity_with_transformers_clip(hf_folder, scorer):
    folder, ref = hf_folder
    model, tokenizer = load_clip(folder)
    pixels = np.asarray(preprocess_frames(_frames(3, 40, 56), 32, crop_rounding="floor"))
    ids = tokenize(tokenizer, CAPTIONS)
    with torch.no_grad():
        px = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        want_img = ref.visual_projection(ref.vision_model(pixel_values=px).pooler_output).numpy()
        want_txt = ref.text_projection(ref.text_model(input_ids=_ids(ids)).pooler_output).numpy()
        both = ref(input_ids=_ids(ids), pixel_values=px)
    img = jax.jit(lambda m, x: m.image_features(x))(model, pixels)
    txt = jax.jit(lambda m, x: m.text_features(x))(model, ids)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    assert rel_err(img, want_img) <= 1e-5
    assert rel_err(txt, want_txt) <= 1e-5
    # the scorer: normalised embeddings, the frames preprocessed inside its jitted program
    assert rel_err(scorer.image_embeddings(_frames(3, 40, 56)), both.image_embeds.numpy()) <= 1e-5
    assert rel_err(scorer.text_embeddings(CAPTIONS), both.text_embeds.numpy()) <= 1e-5
    # clipsim: per video, the mean over its frames of the cosine with its caption (videos of two sizes, batches
    # shared across videos)
    videos = [_frames(3, 40, 56, 1), _frames(2, 32, 32, 2), _frames(4, 40, 56, 3)]
    got = clipsim(scorer, videos, CAPTIONS)
    want = []
    for video, caption in zip(videos, CAPTIONS):
        px = torch.from_numpy(np.asarray(preprocess_frames(video, 32, crop_rounding="floor"))).permute(0, 3, 1, 2)
        with torch.no_grad():
            out = ref(input_ids=_ids(tokenize(tokenizer, [caption])), pixel_values=px)
        want.append((out.image_embeds.double() @ out.text_embeds.double().T).mean().item())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_openai_torchscript_file(tmp_path):
    """A tiny OpenAI CLIP, saved as a TorchScript .pt as clip.load's files are, loads and matches encode_*."""
    openai = _openai_module()
    torch.manual_seed(1)
    ref = openai.CLIP(16, 32, 2, 64, 8, 77, VOCAB, 64, 1, 2).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pixels = np.asarray(preprocess_frames(_frames(2, 45, 32), 32))
    ids = tokenize(default_tokenizer(), CAPTIONS[:2])
    px = torch.from_numpy(pixels).permute(0, 3, 1, 2)

    class Traced(type(ref)):  # the same modules and keys; tracing the real forward costs seconds, and the loader
        def forward(self, x):  # reads only the parameters
            return x

    archive = Traced(16, 32, 2, 64, 8, 77, VOCAB, 64, 1, 2)
    archive.load_state_dict(ref.state_dict())
    torch.jit.trace(archive, torch.zeros(1), check_trace=False).save(str(tmp_path / "ViT-tiny.pt"))
    model, _ = load_clip(tmp_path / "ViT-tiny.pt")
    assert model.crop_rounding == "round" and model.config.vision.num_attention_heads == 1
    with torch.no_grad():
        want_img, want_txt = ref.encode_image(px).numpy(), ref.encode_text(_ids(ids)).numpy()
    assert rel_err(jax.jit(lambda m, x: m.image_features(x))(model, pixels), want_img) <= 1e-5
    assert rel_err(jax.jit(lambda m, x: m.text_features(x))(model, ids), want_txt) <= 1e-5


def test_bad_inputs(scorer, tmp_path):
    with pytest.raises(CLIPSIMInputError, match="one caption per video"):
        clipsim(scorer, [_frames(2, 32, 32)], CAPTIONS[:2])
    with pytest.raises(CLIPSIMInputError, match="one caption per video"):  # an iterable that runs out early
        clipsim(scorer, iter([_frames(2, 32, 32)]), CAPTIONS[:2])
    with pytest.raises(CLIPSIMInputError, match="uint8"):
        scorer.image_embeddings(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(CLIPSIMInputError, match="channels last"):
        scorer.image_embeddings(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(CLIPSIMInputError, match="list"):
        scorer.text_embeddings("one caption")
    with pytest.raises(CLIPLoadError, match="does not exist"):
        load_clip(tmp_path / "ViT-B-32.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CLIPLoadError, match="config.json"):
        load_clip(tmp_path / "empty")
    with pytest.raises(CLIPLoadError, match="ResNet"):
        openai_to_transformers({"visual.layer1.0.conv1.weight": np.zeros((1,))})


def test_mesh_sharded_batches_match(scorer):
    """On a (data 2, fsdp 4) mesh each batch is split over the 8 devices (the batch size rounds up to 8) and the
    embeddings are those of the single-device run."""
    from lavie_jax.parallel import make_mesh

    frames = _frames(5, 40, 56)
    sharded = CLIPScorer(model=scorer.model, tokenizer=scorer.tokenizer, batch_size=3, mesh=make_mesh((2, 4, 1, 1)))
    assert sharded.runner.batch_size == 8
    np.testing.assert_allclose(sharded.image_embeddings(frames), scorer.image_embeddings(frames), rtol=1e-5,
                               atol=1e-6)

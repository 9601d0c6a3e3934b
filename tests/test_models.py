"""The default model gives ImageNet-sensible answers on real photos."""

import numpy as np
import pytest
import torch

from imgindex.pipeline.decode import center_crop
from imgindex.pipeline.embed import Embedder, ModelSpec
from imgindex.pipeline.errors import ModelUnavailable
from imgindex.pipeline.models import get_model
from tests.helpers import import_or_skip

skdata = import_or_skip("skimage.data")

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUPS = {967, 968}  # espresso, cup


def top5(embedder: Embedder, rgb: np.ndarray) -> set[int]:
    from PIL import Image

    pre = embedder.model.preprocess
    pixels = center_crop(Image.fromarray(rgb), pre.resize, pre.crop)
    with torch.inference_mode():
        x = embedder.input_tensor([pixels])
        logits = embedder.model.classify(embedder.model.forward(x))
    return set(logits[0].topk(5).indices.tolist())


def test_chelsea_is_a_cat_and_coffee_is_a_cup():
    # torch's model has the classifier head; ONNX Runtime's graph does not.
    embedder = Embedder(ModelSpec(device="cpu", runtime="torch"))
    assert top5(embedder, skdata.chelsea()) & CATS
    assert top5(embedder, skdata.coffee()) & CUPS


def test_vectors_are_unit_float32_1280d():
    embedder = Embedder(ModelSpec(device="cpu"))
    from PIL import Image

    pixels = [
        center_crop(Image.fromarray(skdata.chelsea()), 256, 224),
        center_crop(Image.fromarray(skdata.coffee()), 256, 224),
    ]
    v = embedder.embed_pixels(pixels)
    assert v.shape == (2, 1280) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert float(v[0] @ v[1]) < 0.9  # a cat is not a coffee cup


def test_model_is_loaded_once_per_process():
    assert get_model("efficientnet-lite0", "cpu") is get_model(
        "efficientnet-lite0", "cpu"
    )


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelUnavailable, match="unknown model 'nope'"):
        get_model("nope", "cpu")


def test_plugin_without_its_package_names_the_package():
    with pytest.raises(ModelUnavailable, match="needs the package 'open_clip'"):
        get_model("open_clip:ViT-B-32/laion2b_s34b_b79k", "cpu")


def test_folded_batchnorm_matches_the_eager_model():
    from imgindex.pipeline.models import efficientnet_lite0

    embedder = Embedder(ModelSpec(device="cpu", runtime="torch"))
    from PIL import Image

    pixels = [
        center_crop(Image.fromarray(skdata.chelsea()), 256, 224),
        center_crop(Image.fromarray(skdata.astronaut()), 256, 224),
    ]
    fast = embedder.embed_pixels(pixels)
    plain = efficientnet_lite0(fold_batchnorm=False)
    with torch.inference_mode():
        x = embedder.input_tensor(pixels).contiguous()
        slow = plain.extract_features(x).mean(dim=(2, 3)).numpy()
    slow /= np.linalg.norm(slow, axis=1, keepdims=True)
    cosines = (fast * slow).sum(axis=1)
    assert cosines.min() >= 0.999, cosines

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgindex.pipeline.decode import decode_image
from imgindex.pipeline.errors import DecodeError
from tests.conftest import write_bad_files


def test_output_shape_and_type(tmp_path: Path):
    p = tmp_path / "a.jpg"
    Image.new("RGB", (640, 480), (10, 200, 30)).save(p)
    out = decode_image(p)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert abs(int(out[..., 1].mean()) - 200) <= 2


@pytest.mark.parametrize(
    "name", ["empty.jpg", "truncated.jpg", "random.jpg", "text.png"]
)
def test_bad_files_raise_decode_error_with_reason(tmp_path: Path, name: str):
    expected = write_bad_files(tmp_path)
    with pytest.raises(DecodeError) as info:
        decode_image(tmp_path / name)
    assert expected[name] in info.value.reason
    assert "\n" not in info.value.reason

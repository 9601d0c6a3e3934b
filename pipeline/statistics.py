"""What is odd in a collection: images far from all others, and blurred, dark,
bright or tiny ones, from the traits the build measured (no second pass).

Thresholds (dask config ``imgindex.statistics.*``), measured with
pipeline.traits.image_traits on scikit-image's photos: sharp photos have a
sharpness of 50 (the soft moon) to 2,500 (grass); blurred with a Gaussian of
sigma 4 px (at 512 px) all fall to 1.6-43 and with sigma 2 most fall below
30, so 20 flags clear blur and spares soft photos. A night sky (Hubble's deep
field) has a brightness of 19.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgindex.pipeline.config import config_number
from imgindex.pipeline.errors import ConfigError


@dataclass(frozen=True)
class StatisticsSettings:
    blurry: float = 20.0  # sharpness (Laplacian variance of the model input) below
    dark: float = 40.0  # mean grey level (0-255) below
    bright: float = 215.0  # mean grey level above
    tiny: int = 64  # pixels on the shorter side below
    outliers: float = 0.01  # share of images, farthest from their nearest neighbour

    @classmethod
    def from_config(cls) -> StatisticsSettings:
        """Settings from ``imgindex.statistics.*``; bad values raise ConfigError."""
        settings = cls(
            blurry=config_number(None, "imgindex.statistics.blurry"),
            dark=config_number(None, "imgindex.statistics.dark"),
            bright=config_number(None, "imgindex.statistics.bright"),
            tiny=config_number(None, "imgindex.statistics.tiny", int),
            outliers=config_number(None, "imgindex.statistics.outliers"),
        )
        if not 0 <= settings.outliers <= 1:
            raise ConfigError(
                f"imgindex.statistics.outliers {settings.outliers} is not a share "
                "between 0 and 1"
            )
        return settings

    def describe(self) -> dict[str, str]:
        """What each flag means, as the report says it."""
        return {
            "blurry": f"sharpness below {self.blurry:g}",
            "dark": f"mean grey level below {self.dark:g} of 255",
            "bright": f"mean grey level above {self.bright:g} of 255",
            "tiny": f"shorter side below {self.tiny} pixels",
        }


def flag_rows(
    traits: np.ndarray, has_traits: np.ndarray, settings: StatisticsSettings
) -> dict[str, np.ndarray]:
    """Rows flagged blurry, dark, bright or tiny (rows without traits never are)."""
    short_side = np.minimum(traits["width"], traits["height"])
    return {
        "blurry": has_traits & (traits["sharpness"] < settings.blurry),
        "dark": has_traits & (traits["brightness"] < settings.dark),
        "bright": has_traits & (traits["brightness"] > settings.bright),
        "tiny": has_traits & (short_side < settings.tiny),
    }


def outlier_rows(nearest: np.ndarray, share: float) -> np.ndarray:
    """Rows of the ``share`` of images least like their nearest neighbour, the
    loneliest first (``nearest``: each image's best cosine to another)."""
    count = int(np.ceil(share * len(nearest))) if len(nearest) > 1 else 0
    if count == 0:
        return np.zeros(0, np.int64)
    rows = np.argpartition(nearest, count - 1)[:count]
    return rows[np.argsort(nearest[rows], kind="stable")]

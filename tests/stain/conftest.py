import numpy as np
import openslide
import pytest
import torch
from PIL import Image


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)  # 3 x H x W uint8


@pytest.fixture(scope="session")
def carcinoma(sources) -> torch.Tensor:
    """The real 1000 x 1000 H&E carcinoma image."""
    return _tensor(np.array(Image.open(sources["carcinoma"]).convert("RGB")))


@pytest.fixture(scope="session")
def skin_tiles(cmu_svs) -> torch.Tensor:
    """Nine real 224-px tiles from the tissue of the CMU Aperio scan (9 x 3 x 224 x 224)."""
    with openslide.OpenSlide(str(cmu_svs)) as slide:
        region = np.array(slide.read_region((700, 1200), 0, (1000, 1000)).convert("RGB"))
    return torch.stack(
        [_tensor(region[y : y + 224, x : x + 224]) for y in (0, 300, 600) for x in (0, 300, 600)]
    )

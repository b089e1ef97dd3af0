"""Shared fixtures: phantom archives (always) and ../shared/data (skipped when absent)."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("CXRSCREEN_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present (real data lives in ../shared/data; set CXRSCREEN_SHARED_DATA)")
    return p


@pytest.fixture(scope="session")
def phantom_archive(tmp_path_factory) -> Path:
    """48 phantoms in PNG, 16-bit PNG, JPEG and DICOM, plus phantoms.parquet."""
    from cxrscreen.data.synth import write_archive

    out = tmp_path_factory.mktemp("phantoms")
    write_archive(out, 48, seed=3, size=128, formats=("png", "png16", "jpeg", "dicom"), parquet=True)
    return out


@pytest.fixture(scope="session")
def ray_2cpu():
    """An embedded local Ray with exactly 2 CPUs (the CI machine's size)."""
    from cxrscreen.cluster import init_ray

    ray = init_ray(num_cpus=2)
    assert "RAY_prestart_worker_first_driver" in os.environ  # no idle workers for the driver (start-up)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mixed_archive(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Good phantoms (PNG, JPEG, DICOM) mixed with every kind of broken file.

    Returns the images folder and {key: expected error kind} of the broken ones."""
    from cxrscreen.data.synth import write_archive, write_bad_inputs

    out = tmp_path_factory.mktemp("mixed")
    write_archive(out, 24, seed=5, size=128, formats=("png", "jpeg", "dicom"), parquet=True)
    bad = write_bad_inputs(out / "images" / "bad")
    good = sorted((out / "images").rglob("*.png"))[0]
    # a good image whose name is not UTF-8 (Latin-1 e-acute): an ordinary row, key "caf\xe9.png"
    (out / "images").joinpath(os.fsdecode(b"caf\xe9.png")).write_bytes(good.read_bytes())
    return out / "images", {f"bad/{k}": v for k, v in bad.items()}


@pytest.fixture(scope="session")
def whole_image_classifier(tmp_path_factory) -> str:
    """A cxrnet checkpoint (seeded random weights) that classifies whole images, for tests of
    paths that the shipped lung-crop classifier would take a detour around."""
    import torch

    from cxrscreen.models import build_model, save_checkpoint
    from cxrscreen.models.checkpoint import ModelInfo

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("whole_image_classifier")
    save_checkpoint(out, build_model("cxrnet", 4, 1, widths=(8, 16, 32)),
                    ModelInfo("cxrnet", "classify", ["covid", "normal", "viral_pneumonia", "bacterial_pneumonia"],
                              128, 1, {"widths": [8, 16, 32]}))
    return str(out)

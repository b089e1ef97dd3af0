"""Site profiles: a classifier's calibration refitted on a labelled sample of one site's archive
(``cxrscreen calibrate``), used by ``cxrscreen score --site PROFILE``.

A profile folder holds ``profile.json`` (temperature, COVID referral threshold, OOD threshold,
what it was fitted on, and the sha256 of the classifier weights it belongs to) and
``ood.safetensors`` (the checkpoint's Mahalanobis reference with the site's class means added,
so the site's own kind of image stops counting as out of distribution).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cxrscreen.models.ood import OODReference

PROFILE_FILE = "profile.json"


@dataclass
class SiteProfile:
    name: str | None
    classifier_sha256: str
    temperature: float = 1.0
    refer_threshold: float | None = None
    ood_threshold: float | None = None
    fitted_on: dict = field(default_factory=dict)  # images, classes, target sensitivity, metrics
    reference: OODReference | None = None

    @classmethod
    def from_checkpoint(cls, loaded) -> SiteProfile:
        """The checkpoint's own calibration (what scoring uses without ``--site``)."""
        i = loaded.info
        return cls(None, loaded.weights_sha256, i.temperature, i.refer_threshold, i.ood_threshold)

    def save(self, folder: str | Path) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "reference"}
        (out / PROFILE_FILE).write_text(json.dumps(data, indent=2))
        if self.reference is not None:
            self.reference.save(out)
        return out

    @classmethod
    def load(cls, folder: str | Path, loaded) -> SiteProfile:
        """A saved profile, checked field by field and against the loaded classifier's weights."""
        path = Path(folder) / PROFILE_FILE
        if not path.exists():
            raise ValueError(f"{folder}: not a site profile (no {PROFILE_FILE}; make one with cxrscreen calibrate)")
        data = json.loads(path.read_text())
        problems = []
        if set(data) - {"name", "classifier_sha256", "temperature", "refer_threshold", "ood_threshold", "fitted_on"}:
            problems.append(f"unknown fields {sorted(set(data) - set(cls.__dataclass_fields__))}")
        t = data.get("temperature")
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            problems.append(f"field 'temperature' must be a positive number, not {t!r}")
        r = data.get("refer_threshold")
        if r is not None and not (isinstance(r, (int, float)) and 0 <= r <= 1 + 1e-5):
            problems.append(f"field 'refer_threshold' must be null or in [0, 1], not {r!r}")
        o = data.get("ood_threshold")
        if o is not None and not (isinstance(o, (int, float)) and math.isfinite(o) and o >= 0):
            problems.append(f"field 'ood_threshold' must be null or a number >= 0, not {o!r}")
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
        if data.get("classifier_sha256") != loaded.weights_sha256:
            raise ValueError(f"{path}: fitted for other classifier weights ({str(data.get('classifier_sha256'))[:12]}), "
                             f"not {loaded.info.name} {loaded.weights_sha256[:12]}: calibrate again")
        ref = OODReference.load(folder, None if loaded.ood is None else loaded.ood.means.shape[1])
        return cls(**data, reference=ref)

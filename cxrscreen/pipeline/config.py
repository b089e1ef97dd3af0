"""Settings of a scoring run (mapped from configs/score.yaml) and the typed options each
model stage takes whole (``RuntimeOptions``, ``SegmenterOptions``, ``ClassifierOptions``:
their defaults are the one source of ``ScoreConfig``'s)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class RuntimeOptions:
    """How a model stage runs its model (``cxrscreen.runtime.make_runtime``)."""

    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 | int8 (TensorRT only)
    threads: int | None = None  # torch threads; None = the runtime's default
    runtime: str = "auto"  # auto | torch | onnxruntime | tensorrt
    cuda_graphs: bool = False
    compile: bool = False
    int8_calibration: str | None = None  # int8: images to calibrate on


@dataclass(frozen=True)
class SegmenterOptions:
    """The ``Segmenter`` stage: which weights, mask threshold and stored mask size."""

    spec: str = "unet-lungs-fast"  # shipped weights or a checkpoint folder
    mask_size: int = 256
    threshold: float = 0.5
    allow_untrained: bool = False


@dataclass(frozen=True)
class ClassifierOptions:
    """The ``Classifier`` stage: which weights, referral thresholds and rules, heatmaps."""

    spec: str = "cxrnet-4class"  # shipped weights or a checkpoint folder
    lung_crop: bool = False
    refer_below: float | None = None  # None: the site profile's, else the checkpoint's
    ood_threshold: float | None = None  # None: the site profile's, else the checkpoint's
    min_polarity: float = 0.0
    lung_fraction_range: tuple[float, float] = (0.05, 0.7)
    cam: str | None = None
    cam_size: int = 128
    site: str | None = None
    allow_untrained: bool = False


@dataclass
class ScoreConfig:
    """Every setting of ``cxrscreen score`` (the one source of their defaults); the ``*_options``
    methods give the model actors' share. Checked when loaded (``cxrscreen.config.from_dict``)."""

    CHOICES: ClassVar[dict] = {
        "device": ("auto", "cpu", "cuda"), "precision": ("auto", "fp32", "bf16", "fp16", "int8"),
        "runtime": ("auto", "torch", "onnxruntime", "tensorrt"), "cam": ("gradcam", "gradcampp"),
        "writers": ("auto", "driver", "workers")}
    POSITIVE: ClassVar[tuple] = ("batch_size", "seg_actors", "cls_actors", "actor_cpus", "torch_threads",
                                 "work_size", "mask_size", "cam_size", "rows_per_file", "max_pixels", "max_bytes", "num_cpus", "limit")
    NON_NEGATIVE: ClassVar[tuple] = ("refer_below", "ood_threshold", "lung_fraction_min", "lung_fraction_max")

    classifier: str = ClassifierOptions.spec  # shipped weights or a checkpoint folder (an architecture: allow_untrained)
    segmenter: str = SegmenterOptions.spec  # shipped weights or a checkpoint folder; "" = none
    device: str = RuntimeOptions.device  # auto | cpu | cuda
    precision: str = RuntimeOptions.precision  # auto | fp32 | bf16 | fp16 | int8 (TensorRT only)
    int8_calibration: str | None = None  # int8: folder/list of images to calibrate on (a few hundred)
    runtime: str = RuntimeOptions.runtime  # auto | torch | onnxruntime | tensorrt (auto: fastest available, see README)
    cuda_graphs: bool = RuntimeOptions.cuda_graphs  # torch runtime on CUDA: capture one CUDA graph per batch size
    compile: bool = RuntimeOptions.compile  # torch runtime: torch.compile the models
    batch_size: int = 64  # every block costs Ray a few ms per stage: 16 measured 25-35% slower; 256 see score.yaml
    fused: bool | None = None  # segmenter + classifier in one actor pool (cls_actors actors); None: on a GPU only
    seg_actors: int = 1  # two pools (fused: false) only
    cls_actors: int = 1
    actor_cpus: float | None = None  # CPUs reserved per model actor; None = sized from the cluster
    torch_threads: int | None = None  # per actor; None = sized from the cluster
    work_size: int = 256  # decoded images travel as uint8 work_size x work_size
    decode_jpeg_on_device: bool = False  # JPEGs travel as bytes, decoded in batch by the model actor (nvJPEG on GPU)
    lung_crop: bool = ClassifierOptions.lung_crop  # classify the lung bounding box instead of the whole image
    mask_size: int = SegmenterOptions.mask_size  # stored lung-mask PNG size
    cam: str | None = None  # gradcam | gradcampp: add a heatmap of the predicted class per row
    cam_size: int = ClassifierOptions.cam_size  # stored heatmap PNG size
    refer_below: float | None = None  # refer below this top probability; None = site profile's, else checkpoint's
    ood_threshold: float | None = None  # refer above this ood_score; None = site profile's, else checkpoint's
    min_polarity: float = ClassifierOptions.min_polarity  # refer (atypical_intensity) below this mediastinum-vs-lung contrast
    site: str | None = None  # a site profile folder (cxrscreen calibrate): temperature, thresholds, OOD reference
    allow_untrained: bool = False  # accept an architecture name (random weights) as a model
    lung_fraction_min: float = ClassifierOptions.lung_fraction_range[0]  # refer when the lung area fraction
    lung_fraction_max: float = ClassifierOptions.lung_fraction_range[1]  # is outside this range (not a frontal CXR?)
    rows_per_file: int = 1000  # at most this many rows per output part file (each written atomically)
    first_batch_on_driver: bool = True  # on CPUs, the driver scores the first batch while Ray starts the model actors (any archive kind)
    writers: str = "auto"  # who writes part files: driver | workers | auto (workers if several nodes have CPUs and all see OUT)
    worklist: bool = True  # write worklist.csv and worklist.html into OUT after the run (cxrscreen.results)
    prune: bool = False  # remove rows of inputs no longer in the archive (default: keep them, counted as stale)
    max_pixels: int = 80_000_000
    max_bytes: int = 512 * 2**20  # larger input files are error rows (too_large), never read into memory
    prefer_lut: bool = True
    include_phi: bool = False  # write DICOM patient name/ID/birth date (off: no identifiers)
    image_column: str = "image"  # Parquet archives: bytes column
    key_column: str = "key"  # Parquet archives: key column (else file#row)
    address: str | None = None  # Ray cluster; None = RAY_ADDRESS or an embedded local Ray
    num_cpus: int | None = None  # embedded Ray only
    limit: int | None = None  # score only the first N inputs of the archive (a trial run)

    def decode_options(self) -> dict:
        """Keyword arguments of ``decode_batch`` / ``decode_items`` (besides the work size)."""
        return dict(max_pixels=self.max_pixels, max_bytes=self.max_bytes, prefer_lut=self.prefer_lut, include_phi=self.include_phi,
                    defer_jpeg=self.decode_jpeg_on_device)

    def segmenter_options(self) -> SegmenterOptions:
        return SegmenterOptions(spec=self.segmenter, mask_size=self.mask_size, allow_untrained=self.allow_untrained)

    def classifier_options(self) -> ClassifierOptions:
        return ClassifierOptions(spec=self.classifier, lung_crop=self.lung_crop, refer_below=self.refer_below,
                                 ood_threshold=self.ood_threshold, min_polarity=self.min_polarity, site=self.site,
                                 cam=self.cam, cam_size=self.cam_size, allow_untrained=self.allow_untrained,
                                 lung_fraction_range=(self.lung_fraction_min, self.lung_fraction_max))

    def runtime_options(self, device: str | None = None, threads: int | None = None) -> RuntimeOptions:
        """The model stages' runtime (``device`` / ``threads``: as planned for the cluster)."""
        return RuntimeOptions(device=device or self.device, precision=self.precision,
                              threads=threads or self.torch_threads, runtime=self.runtime,
                              cuda_graphs=self.cuda_graphs, compile=self.compile,
                              int8_calibration=self.int8_calibration if self.precision == "int8" else None)

"""`cxrscreen bench` end to end on a few phantoms (speed is measured in benchmarks/, not here)."""

from pathlib import Path

import polars as pl
import pytest

from cxrscreen.bench import ratios, run_bench, run_ceiling
from cxrscreen.pipeline import ScoreConfig


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_writes_every_mode_and_the_runtime_agreement(tmp_path):
    out = tmp_path / "bench.parquet"
    df = run_bench("phantoms", 24, ScoreConfig(num_cpus=2, device="cpu", precision="fp32"), batch_sizes=(8,), per_file_n=4,
                   out=out, work_dir=tmp_path, echo=lambda *_: None, use_ray=False)
    assert pl.read_parquet(out).equals(df)
    modes = set(df["mode"])
    assert {"a_decode_preprocess", "b_model_forward_runtime", "b_jpeg_bytes_decoded_by_actor", "b_model_forward",
            "d_dataloader", "e_per_file"} <= modes and "c_pipeline" not in modes
    assert (df["images_per_s"] > 0).all()
    forward = df.filter(pl.col("mode") == "b_model_forward")
    assert 0 < forward["segment_time_share"][0] < 1  # segmenter and classifier both take time
    runtimes = df.filter(pl.col("mode") == "b_model_forward_runtime")
    assert sorted(zip(runtimes["runtime"], runtimes["precision"])) == [
        ("onnxruntime", "fp32"), ("torch", "bf16"), ("torch", "fp32")]
    # the configured runtime (auto + fp32 -> onnxruntime) against the torch fp32 reference
    assert df["compared"][0] == "onnxruntime-fp32"
    assert df["max_abs_prob_diff"][0] < 1e-4 and df["label_agreement"][0] == 1.0 and df["min_mask_dice"][0] > 0.99
    assert ratios(df) == {}  # no pipeline mode without Ray


def test_ratios_compare_the_pipeline_with_each_reference_and_with_decode_plus_forward():
    rates = {"a_decode_preprocess": 1000.0, "b_model_forward": 100.0, "c_pipeline": 40.0, "c_pipeline_steady": 88.0,
             "d_dataloader": 80.0, "e_per_file": 20.0}
    df = pl.DataFrame({"mode": list(rates) + ["b_model_forward"], "images_per_s": list(rates.values()) + [50.0]})
    r = ratios(df)  # the best row of each mode: b is 100, not 50
    assert r["c/b steady"] == pytest.approx(0.88) and r["c/d steady"] == pytest.approx(1.1)
    assert r["c/e"] == pytest.approx(2.0) and r["c/b"] == pytest.approx(0.4)
    # a perfect pipeline of (a) then (b) on the same cores: 1 / (1/1000 + 1/100) = 90.9 images/s
    assert r["c/ab steady"] == pytest.approx(88.0 / (1 / (1 / 1000 + 1 / 100)))
    assert r["c/ab steady"] > r["c/b steady"] and r["c/ab steady"] < 1


def test_replay_runtime_returns_the_first_output_for_every_image():
    import torch

    from cxrscreen.models import build_model
    from cxrscreen.runtime import make_runtime

    torch.manual_seed(0)
    model = build_model("cxrnet", 4, 1, widths=(8, 16)).eval()
    rt = make_runtime(model, "cpu", runtime="replay", size=64)
    a, b = torch.randn(3, 1, 64, 64), torch.randn(5, 1, 64, 64)
    first = rt(a)
    with torch.no_grad():
        assert torch.allclose(first[0], model(a[:1])[0], atol=1e-5)  # the real output of the first image ...
    assert rt(b).shape == (5, 4) and torch.equal(rt(b)[4], first[0])  # ... replayed for every later one


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ceiling_runs_the_pipeline_on_every_input_kind(tmp_path):
    out = tmp_path / "ceiling.parquet"
    df = run_ceiling("phantoms", 24, ScoreConfig(device="cpu", batch_size=8), cores=(2,), out=out, work_dir=tmp_path,
                     echo=lambda *_: None)
    assert pl.read_parquet(out).equals(df)
    assert df["input"].to_list() == ["parquet", "parquet_png", "png", "jpeg", "dicom"] and (df["mode"] == "ceiling").all()
    assert (df["ok"] == 24).all() and (df["images_per_s"] > 0).all()
    folders = df.filter(~pl.col("input").str.starts_with("parquet"))  # Parquet rows may all arrive in one block
    assert (folders["images_per_s_per_core"] > 0).all()
    assert (df["ms_decode"] > 0).all() and (df["ms_segment"] > 0).all() and (df["ms_classify"] > 0).all()
    assert (df["first_row_s"] > 0).all() and (df["steady_from_s"] >= 0).all()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ceiling_on_one_core_reads_pre_decoded_parquet(tmp_path):
    """Parquet archives are read by cxrscreen's own read tasks (fractional CPUs): a 1-CPU Ray
    scores them (Ray's Parquet reader took a whole CPU and waited forever there)."""
    df = run_ceiling("phantoms", 24, ScoreConfig(device="cpu", batch_size=8), cores=(1,), work_dir=tmp_path,
                     echo=lambda *_: None, inputs=("parquet",))
    assert df["input"].to_list() == ["parquet"] and df["cores"].to_list() == [1] and df["ok"].to_list() == [24]
    shard = next((tmp_path / "ceiling-parquet-pgm-phantoms-24").glob("shard-*.parquet"))
    assert pl.read_parquet(shard)["image"][0].startswith(b"P5")  # pre-decoded: PGM pixels


def test_gpu_sampler_parses_nvidia_smi_and_is_empty_without_a_gpu(tmp_path, monkeypatch):
    from cxrscreen.bench import GpuSampler

    fake = tmp_path / "nvidia-smi"  # prints what `nvidia-smi --query-gpu=... -lms` prints, then waits
    fake.write_text("#!/bin/sh\necho '55, 1000'\necho '65, 1200'\necho '[N/A], 3'\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    import time

    with GpuSampler(enabled=True) as gpu:
        time.sleep(0.5)
    assert gpu.summary() == {"gpu_util_mean": 60.0, "gpu_util_max": 65.0, "gpu_mem_mib_max": 1200.0,
                             "gpu_samples": 2}
    with GpuSampler(enabled=False) as none:
        pass
    assert none.summary() == {}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_run_script_rehearses_end_to_end_on_cpu(tmp_path):
    """benchmarks/gpu/run.sh --device cpu: the GPU machine's script, the same steps, on CPU,
    with ray made unimportable as it is there; every section and the training step land in $OUT."""
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu" / "run.sh"), "--device", "cpu", "--n", "32",
                           "--budget", "150"], env=env, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "tests exit: 0" in log and "bench exit: 0" in log and "train_step exit: 0" in log, log[-3000:]
    rows = pq.read_table(tmp_path / "gpu_bench.parquet").to_pylist()
    sections = {r["section"] for r in rows}
    assert {"model", "stage", "parts", "profile", "cpu", "agreement"} <= sections, sections
    assert (tmp_path / "profile.txt").stat().st_size > 0
    timed = [r for r in rows if r["section"] in ("model", "stage") and r.get("images_per_s")]
    assert timed and all(r["images_per_s"] > 0 for r in timed)
    agree = [r for r in rows if r["section"] == "agreement"]
    assert agree and all(r["label_agreement"] >= 0.9 and r["min_mask_dice"] > 0.9 for r in agree)
    assert len(pq.read_table(tmp_path / "train_step.parquet")) == 4

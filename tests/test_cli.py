import polars as pl
from click.testing import CliRunner

from cxrscreen import __version__
from cxrscreen.cli import main


def test_version_and_help_on_every_command():
    runner = CliRunner()
    assert __version__ in runner.invoke(main, ["--version"]).output
    for name in main.commands:
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0 and "Usage:" in res.output, name


def test_synth_split_audit_ingest(tmp_path):
    runner = CliRunner()
    out = tmp_path / "ph"
    res = runner.invoke(main, ["synth", "-o", str(out), "-n", "12", "--formats", "png,dicom", "--bad", "--size", "64"])
    assert res.exit_code == 0, res.output
    assert len(list((out / "images" / "bad").iterdir())) == 10
    res = runner.invoke(main, ["split", str(out / "manifest.csv"), "-o", str(tmp_path / "s.csv"), "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert pl.read_csv(tmp_path / "s.csv").height == 12
    res = runner.invoke(main, ["audit", str(out / "manifest.csv"), "-o", str(tmp_path / "pairs.csv")])
    assert res.exit_code == 0 and "0 near-duplicate pairs" in res.output
    res = runner.invoke(main, ["ingest", str(out / "manifest.csv"), "-o", str(tmp_path / "shards"), "--shard-size", "5"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "shards").glob("shard-*.parquet"))) == 3
    res = runner.invoke(main, ["ingest", str(out / "manifest.csv"), "-o", str(tmp_path / "pgm"), "--pixels", "pgm"])
    assert res.exit_code == 2 and "resize" in res.output and not (tmp_path / "pgm").exists()


def test_verbose_flag_turns_rays_own_log_lines_on(tmp_path, monkeypatch):
    from cxrscreen.cluster import verbose

    monkeypatch.setenv("CXRSCREEN_VERBOSE", "0")  # restored after the test (the -v run below sets it)
    assert not verbose()
    assert CliRunner().invoke(main, ["synth", "-o", str(tmp_path / "a"), "-n", "2", "--size", "32"]).exit_code == 0
    assert not verbose()
    assert CliRunner().invoke(main, ["-v", "synth", "-o", str(tmp_path / "b"), "-n", "2", "--size", "32"]).exit_code == 0
    assert verbose()


def test_set_overrides_any_score_key_and_is_checked(tmp_path):
    from cxrscreen.config import load_config, parse_settings
    from cxrscreen.pipeline import ScoreConfig

    given = parse_settings(["mask_size=128", "refer_below=null", "lung_fraction_min=0.1", "segmenter="])
    cfg = load_config(ScoreConfig, None, settings=given, refer_below=0.7)
    assert (cfg.mask_size, cfg.refer_below, cfg.lung_fraction_min, cfg.segmenter) == (128, None, 0.1, "")
    archive = tmp_path / "a"
    assert CliRunner().invoke(main, ["synth", "-o", str(archive), "-n", "2", "--size", "32"]).exit_code == 0
    run = ["score", str(archive / "images"), "-o", str(tmp_path / "out"), "--dry-run"]
    assert CliRunner().invoke(main, run + ["--set", "mask_size=128"]).exit_code == 0
    bad = CliRunner().invoke(main, run + ["--set", "mask_size=big", "--set", "nonsense=1"])
    assert bad.exit_code == 2 and "mask_size: expected int" in bad.output and "nonsense: unknown key" in bad.output
    twice = CliRunner().invoke(main, run + ["--set", "batch_size=4", "--batch-size", "8"])
    assert twice.exit_code == 2 and "give it once" in twice.output
    assert CliRunner().invoke(main, run + ["--set", "oops"]).exit_code == 2
    again = CliRunner().invoke(main, run + ["--set", "mask_size=64", "--set", "mask_size=128"])
    assert again.exit_code == 2 and "given twice" in again.output


def test_evaluate_and_report_name_the_data_option_when_the_manifest_is_not_found(tmp_path, monkeypatch):
    import shutil

    from cxrscreen.models.checkpoint import BUNDLED

    ck = tmp_path / "ck"
    shutil.copytree(BUNDLED / "cxrnet-4class", ck)  # its train_config names ../shared/data/... (relative)
    monkeypatch.chdir(tmp_path)
    for args in (["evaluate", str(ck)], ["report", str(ck), "-o", str(tmp_path / "rep")]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and "not found from" in res.output and "--data PATH" in res.output, res.output


def _options():
    """(command, long option name, option) for every option of every command."""
    import click

    return [(name, opt, p) for name, cmd in main.commands.items() for p in cmd.params
            if isinstance(p, click.Option) for opt in p.opts if opt.startswith("--")]


def test_an_option_name_means_one_thing_in_every_command():
    import click

    kinds: dict[str, set] = {}
    for name, opt, p in _options():
        kind = ("flag" if p.is_flag else type(p.type).__name__ if not isinstance(p.type, click.Choice)
                else "choice:" + ",".join(p.type.choices))
        kinds.setdefault(opt, set()).add(kind)
    assert {o: k for o, k in kinds.items() if len(k) > 1} == {}
    assert "--use-gpu" not in kinds and "--batch-sizes" not in kinds and "--method" not in kinds
    assert kinds["--lung-crop"] == {"flag"} and kinds["--device"] == {"choice:auto,cpu,cuda"}
    # an option that several commands share is given the same way: lists by repeating it, never
    # as one comma-separated value in one command and a single value in another
    shared = {o for o in kinds if sum(opt == o for _, opt, _ in _options()) > 1}
    for name, opt, p in _options():
        assert opt not in shared or "comma" not in (p.help or "").lower(), (name, opt)


def test_help_shows_the_defaults_score_runs_with():
    res = CliRunner().invoke(main, ["score", "--help"], terminal_width=200)
    assert res.exit_code == 0
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.strip().startswith("--")}
    assert "[default: 64]" in lines["--batch-size"] and "[default: cxrnet-4class]" in lines["--classifier"]
    assert "[default: unet-lungs-fast]" in lines["--segmenter"] and "[default: auto]" in lines["--device"]
    assert "[default: true]" in lines["--worklist"] and "[default: false]" in lines["--include-phi"]
    assert "[default:" not in lines["--refer-below"] and "none]" not in res.output
    again = CliRunner().invoke(main, ["score", "--help"], terminal_width=200).output
    assert again.count("[default: 64]") == 1  # the second --help in one process says it once too
    bench = CliRunner().invoke(main, ["bench", "--help"], terminal_width=200).output
    assert "[default: 1]" in bench and "[default: 1, 2]" in bench  # --actors, --cores


def test_repeated_options_give_lists(monkeypatch, tmp_path):
    import cxrscreen.bench as bench

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda source, n, cfg, actors, sizes, *a, **k: seen.update(
        actors=actors, sizes=sizes) or pl.DataFrame())
    monkeypatch.setattr(bench, "ratios", lambda df: {})
    res = CliRunner().invoke(main, ["bench", "--actors", "1", "--actors", "2", "--batch-size", "8", "--no-ray",
                                    "-o", str(tmp_path / "b.parquet")])
    assert res.exit_code == 0, res.output
    assert seen == {"actors": (1, 2), "sizes": (8,)}


def test_the_cli_and_the_score_module_import_without_torch_or_ray():
    """Start-up (issue 18.6): torch and Ray load where they are needed (the model check's thread,
    the model actors), not when the CLI or the scoring module is imported; a dry run needs neither."""
    import subprocess
    import sys

    code = ("import sys, cxrscreen.cli, cxrscreen.pipeline.score; "
            "print(sorted(m for m in ('torch', 'ray', 'torchvision', 'segmentation_models_pytorch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_the_classifier_actor_never_imports_torchvision_for_decoded_images(phantom_archive, tmp_path):
    """torchvision (with torch._dynamo: about a second of CPU per process) is imported by a model
    stage only for JPEGs it decodes itself: the classifier actor, given the segmenter's rows of
    PNGs, never imports it."""
    import pickle
    import subprocess
    import sys

    import torch

    from cxrscreen.io.batch import decode_items
    from cxrscreen.io.sources import list_inputs
    from cxrscreen.pipeline.config import ScoreConfig
    from cxrscreen.pipeline.stages import Segmenter

    cfg = ScoreConfig()
    items = [i for i in list_inputs(phantom_archive / "images") if i.key.endswith(".png")][:8]
    threads = torch.get_num_threads()  # a model stage sets torch's threads for its process: restored
    (tmp_path / "batch.pkl").write_bytes(pickle.dumps(Segmenter(cfg.segmenter_options(), cfg.runtime_options("cpu", 1))(
        decode_items(items))))
    torch.set_num_threads(threads)
    code = ("import pickle, sys; from cxrscreen.pipeline.config import ScoreConfig; "
            "from cxrscreen.pipeline.stages import Classifier; cfg = ScoreConfig(); "
            f"batch = pickle.loads(open({str(tmp_path / 'batch.pkl')!r}, 'rb').read()); "
            "out = Classifier(cfg.classifier_options(), cfg.runtime_options('cpu', 1))(batch); "
            "print(len(out['key']), list(out['status']).count('ok'), 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["8", "8", "False"], out.stdout + out.stderr[-2000:]


def test_an_archive_that_cannot_be_scored_is_a_usage_error_before_ray_starts(tmp_path, monkeypatch):
    """Parquet without its columns, with a key missing or repeated, or a CSV list without a path
    column: exit 2 and one line, before any model or Ray starts (and in --dry-run)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    import cxrscreen.pipeline.score as score

    monkeypatch.setattr(score, "_start", lambda cfg: (_ for _ in ()).throw(AssertionError("Ray started")))
    pq.write_table(pa.table({"key": ["a", "b", "a"], "image": [b"1", b"2", b"3"]}), tmp_path / "dup.parquet")
    pq.write_table(pa.table({"key": ["a", None], "image": [b"1", b"2"]}), tmp_path / "null.parquet")
    pq.write_table(pa.table({"id": ["a"], "image": [b"1"]}), tmp_path / "nokey.parquet")
    (tmp_path / "nopath.csv").write_text("file,label\na.png,normal\n")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    for name, why in (("dup.parquet", "occur in more than one row"), ("null.parquet", "rows have no 'key'"),
                      ("nokey.parquet", "need columns"), ("nopath.csv", "needs a 'path' column"),
                      ("corrupt.parquet", "cannot be read as a parquet archive")):
        for extra in ([], ["--dry-run"]):
            res = CliRunner().invoke(main, ["score", str(tmp_path / name), "-o", str(tmp_path / "out")] + extra)
            assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, (name, res.output)
            assert "starting Ray" not in res.output  # refused in one line, before the line that says what starts
    # a spreadsheet's CSV (with a byte-order mark) and a list naming a path twice: one input each
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,label\na.png,normal\na.png,normal\n".encode())
    res = CliRunner().invoke(main, ["score", str(tmp_path / "bom.csv"), "-o", str(tmp_path / "out"), "--dry-run",
                                    "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["inputs"] == 1, res.output
    # an OUT whose rows hold patient identifiers is not mixed with rows without them, nor the reverse
    from cxrscreen.pipeline.output import output_schema

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"key": ["a"], "image": [b"1"]}), good)
    for phi in (True, False):
        out = tmp_path / f"out-{phi}"
        out.mkdir()
        pq.write_table(output_schema(["covid", "normal"], include_phi=phi).empty_table(), out / "part-1-x.parquet")
        flip = [] if phi else ["--include-phi"]
        res = CliRunner().invoke(main, ["score", str(good), "-o", str(out)] + flip)
        assert res.exit_code == 2 and f"written {'with' if phi else 'without'} --include-phi" in res.output, res.output


def test_ctrl_c_while_ray_starts_exits_130_with_one_line(tmp_path, monkeypatch):
    import cxrscreen.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # what SIGINT raises while Ray and the models start

    monkeypatch.setattr(pipeline, "score_archive", interrupted)
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    res = CliRunner().invoke(main, ["score", str(tmp_path / "a.png"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 130 and "interrupted while starting" in res.output and "Aborted" not in res.output

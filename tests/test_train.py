import json

import polars as pl
import pytest
import torch

from cxrscreen.data.synth import write_archive
from cxrscreen.evaluate.run import evaluate_model
from cxrscreen.models import load_model
from cxrscreen.train import TrainConfig, train

pytestmark = pytest.mark.slow  # Ray Train runs (seconds to a minute each)


@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory):
    return write_archive(tmp_path_factory.mktemp("train"), 240, seed=4, size=64)


def _cfg(manifest, out, **kw):
    base = dict(model="cxrnet", data=str(manifest), input_size=64, epochs=10, batch_size=16, lr=3e-3,
                out=str(out), early_stopping_patience=10)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_ray_train_learns_phantoms(phantom_manifest, tmp_path, ray_2cpu, workers):
    out = train(_cfg(phantom_manifest, tmp_path / "m", num_workers=workers))
    for name in ("model.safetensors", "model.json", "train_config.yaml", "history.parquet"):
        assert (out / name).exists()
    hist = pl.read_parquet(out / "history.parquet")
    assert hist["epoch"].to_list() == list(range(10))  # every epoch logged
    assert (hist["epoch_seconds"] > 0).all()
    card = json.loads((out / "model.json").read_text())
    assert card["metrics"]["train_seconds"] > 0
    assert card["metrics"]["val"]["macro_f1"] == pytest.approx(hist["val_macro_f1"].max())
    assert hist["val_macro_f1"].max() >= 0.55  # 4 balanced classes: chance is about 0.25
    res = evaluate_model(out, split="test")  # patient-level test split of the phantoms
    assert res["metrics"]["accuracy"] > 0.45 and res["metrics"]["n"] > 20
    assert 0.05 < res["temperature"] < 20 and 0.0 <= res["refer_threshold"] <= 1.0 + 1e-6
    assert res["sensitivity_with_referral"] >= 0.99 or res["refer_threshold"] > 0
    assert load_model(str(out), "classify").info.refer_threshold == res["refer_threshold"]
    assert res["near_duplicates_train_test"] == 0
    if workers == 1:  # a train image copied into the test split is refused as leakage
        import shutil

        df = pl.read_csv(phantom_manifest)
        src = df.filter(pl.col("split") == "train").row(0, named=True)
        shutil.copytree(phantom_manifest.parent / "images", tmp_path / "images")
        shutil.copy(phantom_manifest.parent / src["path"], tmp_path / "images" / "leak.png")
        leaky = pl.concat([df, pl.DataFrame([{**src, "path": "images/leak.png", "patient_id": "other",
                                              "split": "test"}], schema=df.schema)])
        leaky.write_csv(tmp_path / "leaky.csv")
        with pytest.raises(ValueError, match="near-duplicate"):
            evaluate_model(out, data=str(tmp_path / "leaky.csv"), update_card=False)


@pytest.mark.timeout(600)
def test_resume_continues_from_checkpoint(phantom_manifest, tmp_path, ray_2cpu):
    first = train(_cfg(phantom_manifest, tmp_path / "a", epochs=2))
    resumed = train(_cfg(phantom_manifest, tmp_path / "b", epochs=4, resume_from=str(first)))
    hist = pl.read_parquet(resumed / "history.parquet")
    assert hist["epoch"].to_list() == [0, 1, 2, 3]
    assert hist.head(2).equals(pl.read_parquet(first / "history.parquet"))
    # Adam's moments and step count carry over: the saved (best) epoch's step count counts the
    # epochs run before the resume too, which a fresh optimizer would not
    steps, epochs = [], []
    for d in (first, resumed):
        steps.append(torch.load(d / "optimizer.pt", weights_only=True)["state"][0]["step"].item())
        epochs.append(json.loads((d / "train_state.json").read_text())["epoch"] + 1)
    per_epoch = steps[0] / epochs[0]
    assert epochs[1] > 2 and steps[1] == per_epoch * epochs[1]


@pytest.mark.timeout(600)
def test_bf16_with_weight_average_learns_and_resumes(phantom_manifest, tmp_path, ray_2cpu):
    from safetensors.torch import load_file

    first = train(_cfg(phantom_manifest, tmp_path / "a", epochs=6, precision="bf16", ema_decay=0.9))
    averaged, raw = load_file(first / "model.safetensors"), load_file(first / "train_model.safetensors")
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw)  # the saved model is the average
    assert pl.read_parquet(first / "history.parquet")["val_macro_f1"].max() >= 0.55
    resumed = train(_cfg(phantom_manifest, tmp_path / "b", epochs=7, precision="bf16", ema_decay=0.9,
                         resume_from=str(first)))
    assert pl.read_parquet(resumed / "history.parquet")["epoch"].to_list() == list(range(7))


def test_resume_keeps_averaging_the_saved_weight_average(tmp_path):
    from safetensors.torch import save_file

    from cxrscreen.models import build_model
    from cxrscreen.train.trainer import load_training_state, prepare_model

    cfg = TrainConfig(model="cxrnet", ema_decay=0.9)

    def fresh(seed):
        torch.manual_seed(seed)
        model, ema = prepare_model(build_model("cxrnet", 4, 1, widths=(8, 8)), cfg)
        return model, ema, torch.optim.Adam(model.parameters())

    raw, _, _ = fresh(1)
    avg, _, _ = fresh(2)
    for name, m in (("train_model", raw), ("model", avg)):
        save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, tmp_path / f"{name}.safetensors")
    (tmp_path / "train_state.json").write_text(json.dumps({"epoch": 2, "best": 0.5, "stale": 0, "history": []}))
    model, ema, opt = fresh(3)
    state = load_training_state(tmp_path, model, ema, opt, "cpu", steps_per_epoch=100)
    assert state["epoch"] == 2 and ema.n_averaged.item() == 300  # past the warm-up: decay 0.9
    first = next(iter(raw.state_dict()))
    assert torch.equal(model.state_dict()[first], raw.state_dict()[first])
    assert torch.equal(ema.module.state_dict()[first], avg.state_dict()[first])
    ema.update_parameters(model)  # one more step: 0.9 of the saved average stays (no restart from a copy)
    expected = 0.9 * avg.state_dict()[first] + 0.1 * raw.state_dict()[first]
    assert torch.allclose(ema.module.state_dict()[first], expected, atol=1e-6)


def test_binary_and_3class_tasks(phantom_manifest):
    from cxrscreen.train.data import labeled_splits

    df, classes = labeled_splits(_cfg(phantom_manifest, "x", task="binary"))
    assert classes == ["covid", "non_covid"] and len(df) == 240
    df3, classes3 = labeled_splits(_cfg(phantom_manifest, "x", task="3class"))
    assert classes3 == ["covid", "normal", "viral_pneumonia"] and set(df3["label"]) == set(classes3)


@pytest.mark.timeout(600)
def test_unet_trains_on_phantom_masks(phantom_manifest, tmp_path, ray_2cpu):
    from cxrscreen.evaluate.run import evaluate_segmenter

    cfg = _cfg(phantom_manifest, tmp_path / "unet", model="unet", epochs=4, lr=3e-3,
               model_kwargs={"encoder_name": "resnet18", "decoder_channels": [32, 16, 8, 8, 4]})
    out = train(cfg)
    hist = pl.read_parquet(out / "history.parquet")
    assert hist["val_dice"].max() > 0.8
    res = evaluate_segmenter(out)
    assert res["expert_masks_cleaned"]["n"] > 20  # phantoms: the test split plays the expert role
    assert res["expert_masks_cleaned"]["dice"] > 0.8 and res["pseudo_masks_val_raw"]["iou"] > 0.6
    assert load_model(str(out), "segment").info.task == "segment"
    # adaptation to the "expert" (test) masks: leave-one-out scores, never the adapted model's own
    from cxrscreen.train.adapt import adapt_segmenter

    m = adapt_segmenter(out, tmp_path / "adapted", steps=3, batch_size=4, progress=lambda *_: None)
    n_expert = res["expert_masks_raw"]["n"]
    assert m["expert_masks_loo_raw"]["n"] == n_expert and m["adaptation"]["images"] == n_expert
    # the base model's scores: adaptation runs it in memory (torch fp32), evaluate through the
    # scoring path (the runtime score picks): the same masks up to that runtime's rounding
    assert m["base_expert_masks_raw"]["dice"] == pytest.approx(res["expert_masks_raw"]["dice"], abs=1e-3)
    assert m["base_pseudo_masks_val_raw"]["n"] == res["pseudo_masks_val_raw"]["n"]
    assert m["base_pseudo_masks_val_raw"]["dice"] == pytest.approx(res["pseudo_masks_val_raw"]["dice"], abs=1e-3)
    assert 0.5 < m["expert_masks_loo_raw"]["dice"] <= 1 and m["pseudo_masks_val_raw"]["dice"] > 0.5
    again = evaluate_segmenter(tmp_path / "adapted")
    assert "pseudo_masks_val_raw" in again and not any(k.startswith("expert") for k in again)


def test_mixup_blends_pairs_and_their_losses():
    from cxrscreen.train.trainer import mix_batch, train_step

    torch.manual_seed(0)
    x, y = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous(), torch.tensor([0, 1, 2, 3])
    mixed, partner, lam = mix_batch(x, 0.4)
    assert 0.5 <= lam <= 1 and sorted(partner.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed[:, 0, 0, 0], lam * y.float() + (1 - lam) * y[partner].float())

    # train_step's loss is the lam-weighted loss of both partners' labels
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = torch.nn.CrossEntropyLoss()
    torch.manual_seed(1)
    got = train_step(model, x, y, loss_fn, opt, TrainConfig(mixup=0.4))
    torch.manual_seed(1)
    mixed, partner, lam = mix_batch(x, 0.4)
    out = model(mixed)
    assert got == pytest.approx((lam * loss_fn(out, y) + (1 - lam) * loss_fn(out, y[partner])).item(), rel=1e-5)
    assert got != pytest.approx(loss_fn(model(x), y).item(), rel=1e-3)


def test_compactness_loss_is_the_within_class_share_and_train_step_adds_it():
    from cxrscreen.train.trainer import compactness_loss, train_step

    y = torch.tensor([0, 0, 1, 1])
    assert compactness_loss(torch.tensor([[0.0, 0], [0, 0], [3, 4], [3, 4]]), y).item() == 0.0  # tight classes
    e = torch.tensor([[1.0, 0], [-1, 0], [1, 0], [-1, 0]])  # same class means: all variance is within
    assert compactness_loss(e, y).item() == pytest.approx(1.0)
    e = torch.tensor([[0.0, 0], [2, 0], [10, 0], [12, 0]])  # within 4 of total 104
    assert compactness_loss(e, y).item() == pytest.approx(4 / 104)
    assert compactness_loss(e * 7, y).item() == pytest.approx(4 / 104)  # scale-free

    # train_step: cross-entropy + compactness x the loss on the last linear layer's input
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x, y = torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1])
    opt, loss_fn = torch.optim.SGD(model.parameters(), lr=0.0), torch.nn.CrossEntropyLoss()
    got = train_step(model, x, y, loss_fn, opt, TrainConfig(compactness=0.7))
    with torch.no_grad():
        embedding = model[:3](x)
        want = loss_fn(model(x), y) + 0.7 * compactness_loss(embedding, y)
    assert got == pytest.approx(want.item(), rel=1e-5) and got > loss_fn(model(x), y).item()
    assert train_step(model, x, y, loss_fn, opt, TrainConfig()) == pytest.approx(loss_fn(model(x), y).item(), rel=1e-5)
    assert not model[3]._forward_pre_hooks  # the hook is gone after the step
    assert compactness_loss(e, torch.tensor([0, 0, 1, 1]), 5).item() == pytest.approx(4 / 104)  # absent classes: no change
    with pytest.raises(ValueError, match="hard class targets"):
        TrainConfig(compactness=0.1, mixup=0.2)


def test_augment_warps_the_mask_with_the_image_and_keeps_intensities_in_range():
    from cxrscreen.train.config import AugmentConfig
    from cxrscreen.train.data import augment_image

    torch.manual_seed(0)
    square = torch.zeros(1, 64, 64)
    square[:, 20:44, 16:40] = 1.0
    warp = AugmentConfig(zoom=0.2, shift=0.1, rotate=15.0, intensity=0.0)
    for _ in range(5):
        img, mask = augment_image(square.clone(), warp, square.clone())
        a, b = img > 0.5, mask > 0.5
        assert (a & b).sum() / (a | b).sum() > 0.97  # one warp for both
        assert not torch.equal(b, square > 0.5)  # and it did move them

    ramp = torch.linspace(0, 1, 64).expand(1, 64, 64).contiguous()
    tone = AugmentConfig(zoom=0.0, shift=0.0, rotate=0.0, intensity=0.0, gamma=0.5)
    mids = []
    for _ in range(20):
        out, _ = augment_image(ramp.clone(), tone)
        row = out[0, 0]
        assert out.min() >= 0 and out.max() <= 1 and torch.all(row[1:] >= row[:-1])  # monotone tone curve
        assert row[0] == pytest.approx(0, abs=1e-6) and row[-1] == pytest.approx(1, abs=1e-6)
        mids.append(row[32].item())
    g = torch.tensor(mids).log() / torch.tensor(ramp[0, 0, 32].item()).log()  # the gamma each draw used
    assert g.min() >= torch.exp(torch.tensor(-0.5)) - 1e-4 and g.max() <= torch.exp(torch.tensor(0.5)) + 1e-4
    assert g.max() - g.min() > 0.3  # and it varies


def test_random_erasing_greys_one_rectangle_and_leaves_the_rest():
    from cxrscreen.train.config import AugmentConfig
    from cxrscreen.train.data import augment_image

    torch.manual_seed(0)
    x = torch.rand(1, 64, 80)
    still = AugmentConfig(zoom=0.0, shift=0.0, rotate=0.0, intensity=0.0, erase=1.0)
    fractions = []
    for _ in range(30):
        out, _ = augment_image(x.clone(), still)
        changed = ((out - x).abs() > 1e-4)[0]  # (the identity warp resamples within float error)
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        box = out[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert torch.allclose(box, x.mean().expand_as(box), atol=1e-4)  # one rectangle, filled with the mean
        frac = box.numel() / x[0].numel()
        assert 0.015 <= frac <= 0.21  # 2-20% of the image (rounding aside)
        fractions.append(frac)
    assert max(fractions) - min(fractions) > 0.08  # sizes vary
    never = AugmentConfig(zoom=0.0, shift=0.0, rotate=0.0, intensity=0.0, erase=0.0)
    assert torch.allclose(augment_image(x.clone(), never)[0], x, atol=1e-4)


@pytest.mark.timeout(600)
def test_distilled_student_learns_the_classes_from_its_teacher_alone(phantom_manifest, tmp_path, ray_2cpu):
    import numpy as np

    from cxrscreen.predict import ModelRunner, classify_files
    from cxrscreen.train.trainer import ClassifyTask

    teacher = train(_cfg(phantom_manifest, tmp_path / "teacher"))
    cfg = _cfg(phantom_manifest, tmp_path / "student", teachers=[str(teacher)], distill=0.3)
    task = ClassifyTask(cfg, 64)
    _, y = task.arrays("train")
    soft = task.distilled_targets("train", y)
    assert soft.shape == (len(y), 4) and np.allclose(soft.sum(1), 1, atol=1e-5)
    assert (soft[np.arange(len(y)), y] >= 0.7 - 1e-6).all()
    teacher_part = (soft - 0.7 * np.eye(4)[y]) / 0.3  # what the teacher says, row by row
    out, _ = classify_files(ModelRunner(str(teacher), "classify", device="cpu"),
                            task.df.filter(pl.col("split") == "train")["file"].to_list())
    assert (teacher_part.argmax(1) == out.logits.argmax(1)).all()

    # distill=1: the student never sees a label, only the teacher's soft predictions
    student = train(_cfg(phantom_manifest, tmp_path / "student", teachers=[str(teacher)], distill=1.0))
    assert json.loads((student / "model.json").read_text())["metrics"]["val"]["macro_f1"] >= 0.55
    res = evaluate_model(student, split="test", update_card=False)
    assert res["metrics"]["accuracy"] > 0.45
    with pytest.raises(ValueError, match=r"distill must be in \[0, 1\]"):
        ClassifyTask(_cfg(phantom_manifest, tmp_path / "x", teachers=[str(teacher)], distill=1.5),
                     64).distilled_targets("train", y)
    with pytest.raises(ValueError, match="not a trained checkpoint"):
        ClassifyTask(_cfg(phantom_manifest, tmp_path / "x", teachers=["cxrnet"]), 64).distilled_targets("train", y)


def test_label_smoothing_makes_the_smoothed_target_the_loss_minimum(phantom_manifest, tmp_path):
    from cxrscreen.train.trainer import ClassifyTask

    y = torch.tensor([0, 1, 2, 3])

    def loss_at(task, p_true):  # loss when each image gives its true class probability p_true
        p = torch.full((4, 4), (1 - p_true) / 3)
        p[torch.arange(4), y] = p_true
        return task.loss_fn(y.numpy(), "cpu")(p.log(), y).item()

    smooth = ClassifyTask(_cfg(phantom_manifest, tmp_path, label_smoothing=0.2, balance="none"), 64)
    grid = [0.55, 0.7, 0.8, 0.85, 0.9, 0.95, 0.999]
    assert min(grid, key=lambda q: loss_at(smooth, q)) == 0.85  # 1 - 0.2 + 0.2 / 4
    plain = ClassifyTask(_cfg(phantom_manifest, tmp_path, balance="none"), 64)
    assert min(grid, key=lambda q: loss_at(plain, q)) == 0.999  # without smoothing: as confident as it gets


def test_train_refuses_an_input_size_the_model_cannot_take_before_starting_ray(phantom_manifest, tmp_path):
    with pytest.raises(ValueError, match="p3_deep_cnn.*cannot take 64 px.*built for 299 px"):
        train(_cfg(phantom_manifest, tmp_path / "p3", model="p3_deep_cnn"))
    assert not (tmp_path / "p3").exists()  # failed before any worker or output folder

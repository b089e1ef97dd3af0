import pytest
import torch

from cxrscreen.models import build_model, check_input_size, get_entry, list_models, load_model, save_checkpoint
from cxrscreen.models.checkpoint import ModelInfo

CLASSIFIERS = list_models("classify")


def test_registry_has_every_paper_model():
    for name in ("p2_small_cnn", "p3_deep_cnn", "p0_cnn_lstm", "p4_backbone_rnn", "resnet18", "resnet50",
                 "resnet101", "vgg19", "densenet121", "alexnet", "googlenet", "cxrnet"):
        assert name in CLASSIFIERS
    assert list_models("segment") == ["unet"]


@pytest.mark.parametrize("name", [n for n in CLASSIFIERS if n not in ("resnet101", "vgg19", "p2_small_cnn")])
def test_classifier_forward_one_channel(name):
    model = build_model(name, num_classes=3, in_channels=1).eval()
    size = get_entry(name).input_size
    with torch.no_grad():
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 3)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1  # true grayscale, no silent 3x copy


@pytest.mark.parametrize("name,params", [("p2_small_cnn", 23_980_738), ("p0_cnn_lstm", 639_695)])
def test_paper_parameter_counts(name, params):
    n = sum(p.numel() for p in build_model(name, 2 if name == "p2_small_cnn" else 3).parameters())
    assert n == params  # P2 reports ~23.98M, P0 ~638k


@pytest.mark.parametrize("name,size,bad", [("p3_deep_cnn", 299, 224), ("p0_cnn_lstm", 128, 224)])
def test_fixed_size_models_refuse_other_sizes_by_name(name, size, bad):
    check_input_size(name, size)  # its own size passes
    with pytest.raises(ValueError, match=f"{name}.*cannot take {bad} px.*built for {size} px"):
        check_input_size(name, bad)


def test_input_size_check_passes_pooled_models_and_p0_built_for_another_size():
    check_input_size("cxrnet", 224)  # global pooling: any size
    check_input_size("p0_cnn_lstm", 224, input_size=224)  # P0's LSTM sized for another input
    with pytest.raises(ValueError, match="p0_cnn_lstm.*cannot take 128 px.*built for 224 px"):
        check_input_size("p0_cnn_lstm", 128, input_size=224)  # the size its kwargs built it for


def test_p4_lstm_and_gru_over_49_steps():
    for rnn in ("lstm", "gru"):
        m = build_model("p4_backbone_rnn", 2, backbone="resnet18", rnn=rnn).eval()
        assert isinstance(m.rnn, torch.nn.LSTM if rnn == "lstm" else torch.nn.GRU)
        assert m.features(torch.zeros(1, 1, 224, 224)).flatten(2).shape[-1] == 49


def test_unet_segments_one_channel():
    m = build_model("unet", 1).eval()
    with torch.no_grad():
        assert m(torch.zeros(1, 1, 256, 256)).shape == (1, 1, 256, 256)


def test_checkpoint_roundtrip_and_pickle_refused(tmp_path):
    model = build_model("cxrnet", 3)
    info = ModelInfo("cxrnet", "classify", ["a", "b", "c"], 96, temperature=1.7)
    save_checkpoint(tmp_path / "ck", model, info)
    loaded = load_model(str(tmp_path / "ck"), "classify")
    assert loaded.info.classes == ["a", "b", "c"] and loaded.info.temperature == 1.7
    assert len(loaded.weights_sha256) == 64
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.module.state_dict()[k])
    torch.save(model.state_dict(), tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="pickle"):
        load_model(str(tmp_path / "evil.pt"), "classify")
    with pytest.raises(ValueError, match="segment"):
        load_model("unet", "classify", allow_untrained=True)


def test_ensemble_combines_trained_members_into_one_checkpoint(tmp_path):
    import json

    import yaml

    from cxrscreen.models.ensemble import combine_checkpoints

    members, dirs = [], []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        m = build_model("cxrnet", 3, 1, widths=(8, 8)).eval()
        d = tmp_path / f"m{seed}"
        save_checkpoint(d, m, ModelInfo("cxrnet", "classify", ["a", "b", "c"], 32, 1, {"widths": [8, 8]},
                                        temperature=1.7, metrics={"val": {"accuracy": 0.5}, "train_seconds": 10}))
        (d / "train_config.yaml").write_text(yaml.safe_dump({"model": "cxrnet", "seed": seed, "epochs": 3}))
        members.append(m)
        dirs.append(d)
    out = combine_checkpoints(dirs, tmp_path / "ens")
    loaded = load_model(str(out), "classify")
    assert loaded.info.name == "ensemble" and loaded.info.classes == ["a", "b", "c"]
    assert loaded.info.temperature == 1.0  # members' calibration does not carry over: evaluate refits it
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        expected = torch.stack([m(x).log_softmax(1) for m in members]).mean(0)
        assert torch.allclose(loaded.module(x), expected, atol=1e-6)
    card = json.loads((out / "model.json").read_text())
    assert [m["seed"] for m in card["metrics"]["members"]] == [0, 1, 2] and card["metrics"]["train_seconds"] == 30
    assert yaml.safe_load((out / "train_config.yaml").read_text())["model"] == "ensemble"
    odd = tmp_path / "odd"  # a member with other classes is refused
    save_checkpoint(odd, members[0], ModelInfo("cxrnet", "classify", ["a", "b", "x"], 32, 1, {"widths": [8, 8]}))
    (odd / "train_config.yaml").write_text("model: cxrnet\n")
    with pytest.raises(ValueError, match="classes"):
        combine_checkpoints([dirs[0], odd], tmp_path / "bad")

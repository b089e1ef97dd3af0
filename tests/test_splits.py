import polars as pl
from hypothesis import given, settings, strategies as st

from cxrscreen.data.splits import leaking_groups, patient_split
from tests.conftest import shared_path


def _frame(rows):
    return pl.DataFrame(rows, schema={"path": pl.Utf8, "label": pl.Utf8, "patient_id": pl.Utf8}, orient="row")


rows_strategy = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), st.integers(0, 40).map(lambda i: f"p{i}"))),
    min_size=1, max_size=300)


@settings(max_examples=60, deadline=None)
@given(rows_strategy, st.integers(0, 2**16))
def test_split_invariants(raw, seed):
    df = _frame([(f"img{i}", lab, pid) for i, (lab, pid) in enumerate(raw)])
    out = patient_split(df, seed=seed)
    assert sorted(out["path"].to_list()) == sorted(df["path"].to_list())  # each image exactly once
    assert set(out["split"].unique()) <= {"train", "val", "test"}
    assert leaking_groups(out) == []  # no patient in two splits
    assert patient_split(df, seed=seed).equals(out)  # deterministic


def test_split_fractions_per_label():
    df = _frame([(f"img{i}", "ab"[i % 2], f"p{i // 2}") for i in range(1000)])
    out = patient_split(df, seed=1)
    for lab in "ab":
        counts = dict(out.filter(pl.col("label") == lab).group_by("split").len().iter_rows())
        assert abs(counts["train"] - 350) <= 2 and abs(counts["val"] - 75) <= 2 and abs(counts["test"] - 75) <= 2


def test_cap_per_class_keeps_whole_patients():
    df = _frame([(f"img{i}", "ab"[i % 2], f"p{i // 4}") for i in range(800)])
    out = patient_split(df, seed=0, cap_per_class=170)
    counts = dict(out.group_by("label").len().iter_rows())
    assert all(150 <= c <= 170 for c in counts.values())
    full = df.group_by("patient_id").len()
    kept = out.group_by("patient_id").len()
    assert kept.join(full, on="patient_id").filter(pl.col("len") != pl.col("len_right")).is_empty()


def test_shared_manifest_split_is_patient_level():
    from cxrscreen.data.manifest import read_manifest

    df = read_manifest(shared_path("cxr", "manifest.csv"))
    assert len(df) == 5300 and leaking_groups(df) == []
    resplit = patient_split(df.drop("split"), seed=0)
    assert leaking_groups(resplit) == [] and len(resplit) == 5300


def test_cap_drops_a_leading_patient_larger_than_the_cap():
    big = [(f"big{i}", "a", "p_big") for i in range(200)]  # one patient above the cap: never kept
    df = _frame(big + [(f"img{i}", "ab"[i % 2], f"p{i}") for i in range(400)])
    out = patient_split(df, seed=0, cap_per_class=100)
    assert "p_big" not in out["patient_id"].to_list()
    assert dict(out.group_by("label").len().iter_rows()) == {"a": 100, "b": 100}

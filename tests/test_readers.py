"""JSON Lines and Parquet readers: images from files and arrays, errors that name the file,
row and field, and counted skipping."""

import json
import logging

import numpy as np
import pytest

from r4b.data import RowError, Sample, read_jsonl, read_parquet, read_samples


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def data_dir(tmp_path):
    rng = np.random.default_rng()
    (tmp_path / "imgs").mkdir()
    a = rng.random((3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "imgs" / "a.npy", a)
    g = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    np.save(tmp_path / "imgs" / "g.npy", g)
    return tmp_path, a, g


def test_jsonl_good_rows(data_dir):
    d, a, g = data_dir
    nested = np.random.default_rng().random((1, 4, 5)).round(3)
    rows = [
        {"question": "<image> what is 1/2 + 1/2?", "answer": "1", "images": ["imgs/a.npy"],
         "reasoning": "1/2+1/2=1", "topic": "math", "id": 7, "source": "x"},
        {"question": "two images?", "answer": 42, "images": [str(d / "imgs" / "g.npy"),
                                                             nested.tolist()]},
        {"question": "no image", "answer": 0.1, "verifiable": False},
    ]
    path = _write_jsonl(d / "data.jsonl", rows[:1] + [""] + rows[1:])
    samples, stats = read_jsonl(path)
    assert stats.rows_total == 3 and stats.rows_read == 3 and stats.rows_skipped == 0
    s0, s1, s2 = samples
    assert isinstance(s0, Sample)
    assert s0.uid == "7" and s0.topic == "math" and s0.reasoning == "1/2+1/2=1"
    assert s0.meta == {"source": "x"} and s0.verifiable
    np.testing.assert_array_equal(s0.image, a)
    assert s1.uid == "data.jsonl:3" and s1.answer == "42" and s1.n_images == 2
    np.testing.assert_allclose(s1.images[0], g[None].astype(np.float32) / 255.0)
    assert s1.images[1].dtype == np.float32
    np.testing.assert_allclose(s1.images[1], nested, rtol=1e-6)
    assert s2.answer == "0.1" and s2.images == [] and not s2.verifiable and s2.topic == "general"


BAD = [  # (row, field named in the error)
    ({"answer": "1"}, "question"),
    ({"question": "  ", "answer": "1"}, "question"),
    ({"question": "q", "answer": None}, "answer"),
    ({"question": "q", "answer": True}, "answer"),
    ({"question": "q", "answer": ""}, "answer"),
    ({"question": "q", "answer": "1", "reasoning": 5}, "reasoning"),
    ({"question": "q", "answer": "1", "verifiable": "yes"}, "verifiable"),
    ({"question": "q", "answer": "1", "topic": ""}, "topic"),
    ({"question": "q", "answer": "1", "images": "imgs/a.npy"}, "images"),
    ({"question": "q", "answer": "1", "images": ["imgs/missing.npy"]}, "images"),
    ({"question": "q", "answer": "1", "images": [[[0.0, 2.0]]]}, "images"),
    ({"question": "q", "answer": "1", "images": [[[0.1], [0.2, 0.3]]]}, "images"),
    ({"question": "q", "answer": "1", "images": [[[[0.1]] * 2] * 2]}, "images"),
    ({"question": "q", "answer": "1", "images": ["imgs/a.txt"]}, "images"),
    ({"question": "<image><image>", "answer": "1", "images": ["imgs/a.npy"]}, "question"),
    ("{not json", "<json>"),
]


@pytest.mark.parametrize("row,fld", BAD)
def test_jsonl_bad_row_names_file_row_field(data_dir, row, fld):
    d, _, _ = data_dir
    good = {"question": "q", "answer": "1"}
    path = _write_jsonl(d / "bad.jsonl", [good, good, row])
    with pytest.raises(RowError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert str(path) in msg and "row 3" in msg and f"field {fld!r}" in msg


def test_skip_bad_rows_counts_and_logs(data_dir, caplog):
    d, _, _ = data_dir
    good = {"question": "q", "answer": "1"}
    path = _write_jsonl(d / "mixed.jsonl", [good, BAD[0][0], good, "{oops", BAD[9][0], good])
    logger = logging.getLogger("r4b.data.readers")
    logger.addHandler(caplog.handler)
    try:
        samples, stats = read_jsonl(path, skip_bad_rows=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert len(samples) == 3 and stats.rows_read == 3
    assert stats.rows_total == 6 and stats.rows_skipped == 3 and len(stats.errors) == 3
    assert "row 2" in stats.errors[0] and "row 4" in stats.errors[1]
    assert any("skipped 3 of 6 rows" in r.getMessage() for r in caplog.records)


def test_image_shape_check(data_dir):
    d, _, _ = data_dir
    path = _write_jsonl(d / "s.jsonl", [{"question": "q", "answer": "1", "images": ["imgs/a.npy"]}])
    assert read_jsonl(path, image_shape=(3, 8, 8))[0][0].image.shape == (3, 8, 8)
    with pytest.raises(RowError, match="expected \\(1, 8, 8\\)"):
        read_jsonl(path, image_shape=(1, 8, 8))


def test_png_images(data_dir):
    pil = pytest.importorskip("PIL.Image")
    d, _, _ = data_dir
    rgb = np.random.default_rng().integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    pil.fromarray(rgb).save(d / "imgs" / "c.png")
    path = _write_jsonl(d / "p.jsonl", [{"question": "q", "answer": "1", "images": ["imgs/c.png"]}])
    img = read_jsonl(path)[0][0].image
    np.testing.assert_allclose(img, rgb.transpose(2, 0, 1).astype(np.float32) / 255.0)


def test_parquet(data_dir):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    d, a, _ = data_dir
    arr = np.random.default_rng().random((1, 3, 3)).round(4)
    table = pa.table({
        "question": ["q1", "q2", "q3", "q4"],
        "answer": ["1", "2", "", "4"],
        "images": [["imgs/a.npy"], None, None, None],
        "reasoning": [None, "r", None, None],
    })
    pq.write_table(table, d / "t.parquet", row_group_size=2)
    with pytest.raises(RowError) as e:
        read_parquet(d / "t.parquet")
    assert "t.parquet: row 3: field 'answer'" in str(e.value)
    samples, stats = read_samples(d / "t.parquet", skip_bad_rows=True)
    assert [s.question for s in samples] == ["q1", "q2", "q4"] and stats.rows_skipped == 1
    np.testing.assert_array_equal(samples[0].image, a)
    assert samples[1].reasoning == "r" and samples[1].images == []
    # array images as nested list columns
    pq.write_table(pa.table({"question": ["q"], "answer": ["5"], "images": [[arr.tolist()]]}),
                   d / "n.parquet")
    np.testing.assert_allclose(read_parquet(d / "n.parquet")[0][0].image, arr, rtol=1e-6)
    pq.write_table(pa.table({"prompt": ["q"], "answer": ["5"]}), d / "m.parquet")
    with pytest.raises(RowError, match="must include 'question'"):
        read_parquet(d / "m.parquet")


def test_read_samples_dispatch(tmp_path):
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        read_samples(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="not an existing file"):
        read_samples(tmp_path / "x.jsonl")

"""Data in the layouts users have: Parquet files as Hugging Face ``datasets`` writes them
(image structs ``{bytes, path}``, a list of them or MathVista's single ``decoded_image``),
raw image bytes, renamed columns (``ReaderConfig.columns``, ``--reader.columns``) and chat
``messages`` rows.  Every file is written here with pyarrow, with real PNG / JPEG bytes
from Pillow; nothing is downloaded."""

import io
import json

import numpy as np
import pytest

from r4b.data import DataFileError, RowError, read_jsonl, read_parquet, read_samples

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
Image = pytest.importorskip("PIL.Image")

# the schema ``datasets`` gives its ``Image()`` feature in Parquet, and the metadata it writes
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _hf_metadata(features: dict) -> dict:
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def _encode(width: int, height: int, fmt: str, seed: int) -> tuple[bytes, np.ndarray]:
    """Encoded bytes of a random RGB image and the pixels Pillow decodes from them."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    data = buf.getvalue()
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return data, decoded.transpose(2, 0, 1).astype(np.float32) / 255.0


def _write(path, columns: dict, features: dict | None = None):
    table = pa.table(columns)
    if features is not None:
        table = table.replace_schema_metadata(_hf_metadata(features))
    pq.write_table(table, path)
    return path


def test_hf_datasets_image_list(tmp_path):
    """``Sequence(Image())``: list<struct<bytes: binary, path: string>>, PNG and JPEG bytes,
    several sizes, rows without images."""
    png, png_px = _encode(37, 23, "PNG", 0)
    jpg, jpg_px = _encode(64, 48, "JPEG", 1)
    big, big_px = _encode(640, 480, "PNG", 2)
    images = pa.array([[{"bytes": png, "path": "a.png"}, {"bytes": jpg, "path": "b.jpg"}],
                       [], [{"bytes": big, "path": None}]], pa.list_(IMAGE))
    path = _write(tmp_path / "train.parquet",
                  {"question": ["q1", "q2", "q3"], "answer": ["1", "2", "3"], "images": images},
                  {"question": {"dtype": "string", "_type": "Value"},
                   "images": {"feature": {"_type": "Image"}, "_type": "Sequence"}})
    samples, stats = read_parquet(path)
    assert stats.rows_read == 3
    assert [tuple(im.shape) for im in samples[0].images] == [(3, 23, 37), (3, 48, 64)]
    assert samples[1].images == []
    assert [tuple(im.shape) for im in samples[2].images] == [(3, 480, 640)]
    np.testing.assert_array_equal(samples[0].images[0], png_px)
    np.testing.assert_array_equal(samples[0].images[1], jpg_px)
    np.testing.assert_array_equal(samples[2].images[0], big_px)
    assert samples[0].meta == {}


def test_mathvista_layout(tmp_path):
    """MathVista's columns: ``image`` a path string (not beside the file), ``decoded_image``
    one image struct, ``choices`` a list of strings; the images are read, none dropped."""
    a, a_px = _encode(520, 305, "PNG", 3)
    b, b_px = _encode(100, 222, "JPEG", 4)
    path = _write(tmp_path / "testmini.parquet", {
        "pid": ["1", "2"], "question": ["Which is larger?", "How many?"],
        "image": ["images/1.jpg", "images/2.jpg"],
        "decoded_image": pa.array([{"bytes": a, "path": None},
                                   {"bytes": b, "path": "2.jpg"}], IMAGE),
        "choices": pa.array([["A", "B"], None], pa.list_(pa.string())),
        "answer": ["B", "7"]},
        {"decoded_image": {"_type": "Image"}})
    samples, _ = read_parquet(path)
    assert [tuple(s.images[0].shape) for s in samples] == [(3, 305, 520), (3, 222, 100)]
    assert all(len(s.images) == 1 for s in samples)
    np.testing.assert_array_equal(samples[0].images[0], a_px)
    np.testing.assert_array_equal(samples[1].images[0], b_px)
    assert samples[0].meta["image"] == "images/1.jpg"  # the path string, kept as meta
    assert samples[0].meta["choices"] == ["A", "B"] and samples[0].meta["pid"] == "1"


def test_single_image_struct_and_raw_bytes(tmp_path):
    """One ``image`` struct column alone; raw encoded bytes (a binary column)."""
    a, a_px = _encode(31, 17, "PNG", 5)
    b, b_px = _encode(40, 30, "JPEG", 6)
    p1 = _write(tmp_path / "one.parquet", {"question": ["q"], "answer": ["1"],
                                           "image": pa.array([{"bytes": a, "path": "x.png"}],
                                                             IMAGE)})
    (s,), _ = read_parquet(p1)
    assert s.images[0].shape == (3, 17, 31)
    np.testing.assert_array_equal(s.images[0], a_px)
    p2 = _write(tmp_path / "raw.parquet", {"question": ["q", "r"], "answer": ["1", "2"],
                                           "image": pa.array([b, a], pa.binary())})
    s1, s2 = read_parquet(p2)[0]
    assert s1.images[0].shape == (3, 30, 40) and s2.images[0].shape == (3, 17, 31)
    np.testing.assert_array_equal(s1.images[0], b_px)
    p3 = _write(tmp_path / "rawlist.parquet", {"question": ["q"], "answer": ["1"],
                                               "images": pa.array([[b, a]],
                                                                  pa.list_(pa.binary()))})
    (s,), _ = read_parquet(p3)
    assert [im.shape for im in s.images] == [(3, 30, 40), (3, 17, 31)]


def test_struct_path_only_when_bytes_are_null(tmp_path):
    """A struct with null bytes reads its path, inside the data file's folder only."""
    a, a_px = _encode(12, 9, "PNG", 7)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(a)
    good = _write(tmp_path / "p.parquet", {
        "question": ["q"], "answer": ["1"],
        "images": pa.array([[{"bytes": None, "path": "imgs/a.png"}]], pa.list_(IMAGE))})
    (s,), _ = read_parquet(good)
    np.testing.assert_array_equal(s.images[0], a_px)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(a)
    try:
        bad = _write(tmp_path / "o.parquet", {
            "question": ["q"], "answer": ["1"],
            "images": pa.array([[{"bytes": None, "path": str(outside)}]], pa.list_(IMAGE))})
        with pytest.raises(RowError, match="outside the data file's folder") as e:
            read_parquet(bad)
        assert e.value.row == 1 and e.value.field == "images[0]"
        empty = _write(tmp_path / "n.parquet", {
            "question": ["q"], "answer": ["1"],
            "images": pa.array([[{"bytes": None, "path": None}]], pa.list_(IMAGE))})
        with pytest.raises(RowError, match="neither 'bytes' nor 'path'"):
            read_parquet(empty)
    finally:
        outside.unlink()


def test_undecodable_image_is_a_row_error_naming_its_row(tmp_path):
    a, _ = _encode(8, 8, "PNG", 8)
    path = _write(tmp_path / "bad.parquet", {
        "question": ["q1", "q2", "q3"], "answer": ["1", "2", "3"],
        "decoded_image": pa.array([{"bytes": a, "path": None},
                                   {"bytes": a[:40], "path": "cut.png"},
                                   {"bytes": b"not an image at all", "path": None}], IMAGE)})
    with pytest.raises(RowError) as e:
        read_parquet(path)
    assert e.value.row == 2 and e.value.field == "decoded_image"
    assert "row 2" in str(e.value) and "cut.png" in str(e.value)
    samples, stats = read_parquet(path, skip_bad_rows=True)
    assert [s.question for s in samples] == ["q1"]
    assert stats.rows_skipped == 2 and "row 3" in stats.errors[1]


def test_image_bytes_bounds(tmp_path):
    """Bytes obey the limits files do: size before decoding, pixels on the header."""
    a, _ = _encode(100, 80, "PNG", 9)
    path = _write(tmp_path / "b.parquet", {"question": ["q"], "answer": ["1"],
                                           "image": pa.array([a], pa.binary())})
    with pytest.raises(RowError, match="more than max_image_bytes"):
        read_parquet(path, max_image_bytes=len(a) - 1)
    with pytest.raises(RowError, match="8000 pixels, more than max_image_pixels"):
        read_parquet(path, max_image_pixels=7999)
    assert read_parquet(path, max_image_pixels=8000)[0][0].images[0].shape == (3, 80, 100)


def test_image_column_not_read_is_an_error(tmp_path):
    """Image data in a column that is not read as images names the column; it is never
    moved to meta."""
    a, _ = _encode(8, 6, "PNG", 10)
    path = _write(tmp_path / "pic.parquet", {"question": ["q"], "answer": ["1"],
                                             "picture": pa.array([{"bytes": a, "path": None}],
                                                                 IMAGE)})
    with pytest.raises(RowError, match="holds image data but is not read as images") as e:
        read_parquet(path)
    assert e.value.field == "picture" and "--reader.columns images picture" in str(e.value)
    (s,), _ = read_parquet(path, columns={"images": "picture"})
    assert s.images[0].shape == (3, 6, 8) and "picture" not in s.meta
    raw = _write(tmp_path / "raw.parquet", {"question": ["q"], "answer": ["1"],
                                            "thumb": pa.array([a], pa.binary())})
    with pytest.raises(RowError, match="holds image data") as e:
        read_parquet(raw)
    assert e.value.field == "thumb"
    two = _write(tmp_path / "two.parquet", {
        "question": ["q"], "answer": ["1"],
        "image": pa.array([{"bytes": a, "path": None}], IMAGE),
        "decoded_image": pa.array([{"bytes": a, "path": None}], IMAGE)})
    with pytest.raises(RowError, match="say which holds the images"):
        read_parquet(two)
    with pytest.raises(RowError, match="holds image data") as e:  # the other one is not read
        read_parquet(two, columns={"images": "image"})
    assert e.value.field == "decoded_image"


def test_column_mapping_parquet_jsonl_and_cli(tmp_path):
    a, _ = _encode(20, 10, "PNG", 11)
    path = _write(tmp_path / "m.parquet", {
        "problem": ["What is 2+2?"], "solution": ["4"], "rationale": ["2+2=4"],
        "pic": pa.array([{"bytes": a, "path": None}], IMAGE)})
    with pytest.raises(DataFileError, match="must include 'question' and 'answer'"):
        read_parquet(path)
    cols = {"question": "problem", "answer": "solution", "reasoning": "rationale",
            "images": "pic"}
    (s,), _ = read_parquet(path, columns=cols)
    assert (s.question, s.answer, s.reasoning) == ("What is 2+2?", "4", "2+2=4")
    assert s.images[0].shape == (3, 10, 20) and s.meta == {}
    with pytest.raises(DataFileError, match="no such column"):
        read_parquet(path, columns={"question": "prompt", "answer": "solution"})
    # JSON Lines: errors name the file's column
    jl = tmp_path / "m.jsonl"
    jl.write_text(json.dumps({"problem": "p", "solution": "s"}) + "\n"
                  + json.dumps({"problem": "", "solution": "s"}) + "\n")
    with pytest.raises(RowError) as e:
        read_jsonl(jl, columns={"question": "problem", "answer": "solution"})
    assert e.value.row == 2 and e.value.field == "problem"
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"problem": "p", "question": "q", "answer": "1"}) + "\n")
    with pytest.raises(RowError, match="has a 'question' column too"):
        read_jsonl(both, columns={"question": "problem"})
    # the command line: --reader.columns, documented in --help
    from r4b.config import parse_cli
    from r4b.pretrain_bpo import BPOJob

    job = parse_cli(BPOJob, ["--reader.columns", "question", "problem", "answer", "solution",
                             "images", "pic", "reasoning", "rationale"])
    assert job.reader.columns == cols
    (s,), _ = read_samples(path, config=job.reader)
    assert s.answer == "4" and s.images[0].shape == (3, 10, 20)


def test_columns_option_is_validated():
    from r4b.data import ReaderConfig

    with pytest.raises(ValueError, match="'prompt' is not an r4b field"):
        ReaderConfig(columns={"prompt": "q"})
    with pytest.raises(ValueError, match="several fields to the column"):
        ReaderConfig(columns={"question": "x", "answer": "x"})
    with pytest.raises(ValueError, match="non-empty column name"):
        ReaderConfig(columns={"question": ""})


def test_columns_in_help(capsys):
    from r4b.config import parse_cli
    from r4b.pretrain_bpo import BPOJob

    with pytest.raises(SystemExit):
        parse_cli(BPOJob, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--reader.columns" in out and "question problem answer solution" in out


def test_chat_messages_rows(tmp_path):
    """``messages`` rows: content as parts (Parquet, the layout ``datasets`` writes for chat
    data with an ``images`` column) and as strings (JSON Lines)."""
    a, a_px = _encode(50, 40, "PNG", 12)
    b, _ = _encode(30, 60, "JPEG", 13)
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    turn = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    messages = pa.array([
        [{"role": "user", "content": [{"type": "image", "text": None},
                                      {"type": "text", "text": "How many circles?"}]},
         {"role": "assistant", "content": [{"type": "text",
                                            "text": "<think>\nCount: 1, 2, 3.\n</think>\n\n3"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                      {"type": "image", "text": None},
                                      {"type": "image", "text": None}]},
         {"role": "assistant", "content": [{"type": "text", "text": "The left one."}]}],
    ], pa.list_(turn))
    images = pa.array([[{"bytes": a, "path": None}],
                       [{"bytes": a, "path": None}, {"bytes": b, "path": None}]],
                      pa.list_(IMAGE))
    path = _write(tmp_path / "chat.parquet", {"messages": messages, "images": images})
    s1, s2 = read_parquet(path)[0]
    assert s1.question == "<image>\nHow many circles?"
    assert (s1.reasoning, s1.answer) == ("Count: 1, 2, 3.", "3")
    np.testing.assert_array_equal(s1.images[0], a_px)
    assert s2.question == "Compare\n<image>\n<image>" and s2.reasoning is None
    assert [im.shape for im in s2.images] == [(3, 40, 50), (3, 60, 30)]
    assert s2.answer == "The left one." and s1.meta == {} and s2.meta == {}
    # string content, the answer in its own column, a renamed chat column
    jl = tmp_path / "chat.jsonl"
    jl.write_text(json.dumps({"conversations": [{"role": "user", "content": "2+2?"}],
                              "answer": "4"}) + "\n")
    (s,), _ = read_jsonl(jl, columns={"messages": "conversations"})
    assert (s.question, s.answer) == ("2+2?", "4")


CHAT_BAD = [  # (row, field named in the error)
    ({"messages": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "question": "q2"}, "question"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "answer": "b"}, "answer"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}], "answer": "1"},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": "q"}]}],
      "answer": "1"}, "messages[0].content"),  # an image part, no image
    ({"messages": [{"role": "user", "content": "q"}]}, "answer"),
    ({"messages": "q"}, "messages"),
]


@pytest.mark.parametrize("row,fld", CHAT_BAD)
def test_chat_rows_errors(tmp_path, row, fld):
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(RowError) as e:
        read_jsonl(jl)
    assert e.value.row == 2 and e.value.field == fld, str(e.value)

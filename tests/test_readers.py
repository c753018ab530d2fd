"""JSON Lines and Parquet readers: images from files and arrays, errors that name the file,
row and field, counted skipping, and hostile input (duplicate ids, corrupt or oversized images,
paths outside the data folder, undecodable lines, corrupt Parquet, empty files, bad text).

The hostile files are generated here, in ``tmp_path``; nothing is downloaded."""

import io
import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest

from r4b.data import RowError, Sample, load_image, read_jsonl, read_parquet, read_samples
from r4b.data import readers

GOOD = {"question": "q", "answer": "1"}


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _write_jsonl_bytes(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
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


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture()
def reader_log():
    """Records of the readers' logger (the ``r4b`` loggers may not propagate to caplog's)."""
    logger, handler = logging.getLogger("r4b.data.readers"), _Records()
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def _assert_row_error(err, path, row, fld):
    msg = str(err)
    assert str(path) in msg and f"row {row}" in msg and f"field {fld!r}" in msg, msg


# ---------------------------------------------------------------- the schema
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
    ({"question": "q", "answer": "1", "images": ["imgs/missing.npy"]}, "images[0]"),
    ({"question": "q", "answer": "1", "images": [[[0.0, 2.0]]]}, "images[0]"),
    ({"question": "q", "answer": "1", "images": [[[0.1], [0.2, 0.3]]]}, "images[0]"),
    ({"question": "q", "answer": "1", "images": [[[[0.1]] * 2] * 2]}, "images[0]"),
    ({"question": "q", "answer": "1", "images": ["imgs/a.npy", "imgs/a.txt"]}, "images[1]"),
    ({"question": "<image><image>", "answer": "1", "images": ["imgs/a.npy"]}, "question"),
    ("{not json", "<json>"),
    ("[1, 2]", "<row>"),
]


@pytest.mark.parametrize("row,fld", BAD)
def test_jsonl_bad_row_names_file_row_field(data_dir, row, fld):
    d, _, _ = data_dir
    path = _write_jsonl(d / "bad.jsonl", [GOOD, GOOD, row])
    with pytest.raises(RowError) as e:
        read_jsonl(path)
    _assert_row_error(e.value, path, 3, fld)


def test_skip_bad_rows_counts_and_logs(data_dir, reader_log):
    d, _, _ = data_dir
    path = _write_jsonl(d / "mixed.jsonl", [GOOD, BAD[0][0], GOOD, "{oops", BAD[9][0], GOOD])
    samples, stats = read_jsonl(path, skip_bad_rows=True)
    assert len(samples) == 3 and stats.rows_read == 3
    assert stats.rows_total == 6 and stats.rows_skipped == 3 and len(stats.errors) == 3
    assert "row 2" in stats.errors[0] and "row 4" in stats.errors[1]
    assert any("skipped 3 of 6 rows" in r.getMessage() for r in reader_log)


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
    with pytest.raises(ValueError, match="must include 'question'"):
        read_parquet(d / "m.parquet")


def test_read_samples_dispatch(tmp_path):
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        read_samples(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="not an existing file"):
        read_samples(tmp_path / "x.jsonl")


# ---------------------------------------------------------------- options
def test_reader_config_validates_and_old_keywords_still_work(data_dir):
    d, _, _ = data_dir
    cfg_cls = readers.ReaderConfig
    for name, value, bound in [("max_image_pixels", 0, "[1, "), ("max_image_bytes", -1, "[1, "),
                               ("min_rows", 0, "[1, "), ("max_json_depth", 10_000, ", 256]"),
                               ("max_text_chars", 0, "[1, "), ("max_line_bytes", 10, "[64, ")]:
        with pytest.raises(ValueError) as e:
            cfg_cls(**{name: value})
        assert f"reader.{name}" in str(e.value) and bound in str(e.value)
        assert repr(value) in str(e.value)
    for name, value in [("image_shape", (2, 8, 8)), ("image_shape", (3, 0, 8)),
                        ("skip_bad_rows", "yes"), ("allow_paths_outside_data_dir", 1)]:
        with pytest.raises(ValueError, match=f"reader.{name}"):
            cfg_cls(**{name: value})
    path = _write_jsonl(d / "k.jsonl", [GOOD, BAD[0][0], {**GOOD, "id": "x"}])
    by_kw = read_jsonl(path, skip_bad_rows=True)[1]
    by_cfg = read_jsonl(path, config=cfg_cls(skip_bad_rows=True))[1]
    assert (by_kw.rows_read, by_kw.rows_skipped) == (2, 1)
    assert (by_cfg.rows_read, by_cfg.rows_skipped) == (2, 1)
    # a keyword overrides the same field of config=
    with pytest.raises(RowError):
        read_jsonl(path, config=cfg_cls(skip_bad_rows=True), skip_bad_rows=False)
    with pytest.raises(TypeError, match="max_pixels"):
        read_jsonl(path, max_pixels=5)


# ---------------------------------------------------------------- 1. duplicate ids
DUPLICATES = [  # (rows, the id, row of the first use, row of the duplicate)
    ([{**GOOD, "uid": "a"}, GOOD, {**GOOD, "uid": "a"}], "a", 1, 3),
    ([{**GOOD, "id": 5}, {**GOOD, "id": 6}, {**GOOD, "id": 5}], "5", 1, 3),
    ([{**GOOD, "id": 7}, {**GOOD, "uid": "7"}], "7", 1, 2),  # int and str collide downstream
    # an explicit id equal to another row's generated id (file:row), after and before it
    ([GOOD, GOOD, {**GOOD, "id": "dup.jsonl:1"}], "dup.jsonl:1", 1, 3),
    ([{**GOOD, "id": "dup.jsonl:3"}, GOOD, GOOD], "dup.jsonl:3", 1, 3),
]


@pytest.mark.parametrize("rows,uid,first,second", DUPLICATES)
def test_duplicate_ids_are_row_errors(tmp_path, rows, uid, first, second):
    path = _write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(RowError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert str(path) in msg and f"row {second}" in msg and f"row {first}" in msg
    assert repr(uid) in msg and "duplicate id" in msg
    samples, stats = read_jsonl(path, skip_bad_rows=True)
    uids = [s.uid for s in samples]
    assert len(set(uids)) == len(uids) == len(rows) - 1
    assert stats.rows_skipped == 1 and stats.skipped_by_reason == {"duplicate id": 1}
    assert f"row {second}" in stats.errors[0]


def test_duplicate_id_of_a_skipped_row_is_not_a_duplicate(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "answer": "1"}, {**GOOD, "id": 1}])
    samples, stats = read_jsonl(path, skip_bad_rows=True)
    assert [s.uid for s in samples] == ["1"] and stats.skipped_by_reason == {"question": 1}


# ---------------------------------------------------------------- 2. bad image files
def _png_bytes(arr, **save_kw):
    from PIL import Image

    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, "PNG", **save_kw)
    return buf.getvalue()


def _with_png_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR width/height replaced (and the IHDR CRC recomputed): a header
    that claims any size over the original, small pixel data."""
    assert png[12:16] == b"IHDR"
    out = bytearray(png)
    out[16:24] = struct.pack(">II", width, height)
    out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    return bytes(out)


def _jpeg_bytes(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _bad_image(kind, d):
    """``(file name, bytes, reader options, a phrase the error must contain)``."""
    rng = np.random.default_rng()
    rgb = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    png = _png_bytes(rgb)
    idat = png.index(b"IDAT")
    if kind == "corrupt_png":
        bad = png[:idat + 4] + bytes(len(png) - idat - 16) + png[-12:]
        return "x.png", bad, {}, "cannot decode"
    if kind == "truncated_png":
        return "x.png", png[:idat + 20], {}, "cannot decode"
    if kind == "corrupt_jpeg":
        jpg = _jpeg_bytes(rgb)
        return "x.jpg", jpg[:2] + bytes(len(jpg) - 2), {}, "cannot decode"
    if kind == "truncated_jpeg":
        jpg = _jpeg_bytes(rgb)
        return "x.jpg", jpg[:len(jpg) * 2 // 3], {}, "cannot decode"
    if kind == "empty_file":
        return "x.png", b"", {}, "empty"
    if kind == "zero_size_png":
        return "x.png", _with_png_size(png, 0, 0), {}, "cannot decode"
    if kind == "not_an_allowed_format":  # TIFF content under a .png name
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "TIFF")
        return "x.png", buf.getvalue(), {}, "cannot decode"
    if kind == "header_over_max_image_pixels":  # 81 M pixels claimed, refused from the header
        return "x.png", _with_png_size(png, 9000, 9000), {}, "max_image_pixels"
    if kind == "pil_bomb_error":  # 900 M pixels: Pillow's DecompressionBombError
        return "x.png", _with_png_size(png, 30000, 30000), {}, "decompression bomb"
    if kind == "pil_bomb_warning":  # 100 M pixels with our limit raised: Pillow's warning
        return ("x.png", _with_png_size(png, 10000, 10000), {"max_image_pixels": 2 ** 30},
                "decompression bomb")
    if kind == "low_max_image_pixels":
        return "x.png", png, {"max_image_pixels": 255}, "max_image_pixels"
    if kind == "over_max_image_bytes":  # random pixels: ~12 KiB, larger than imgs/a.npy
        big = _png_bytes(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
        return "x.png", big, {"max_image_bytes": len(big) - 1}, "max_image_bytes"
    if kind == "npy_header_over_max_image_pixels":  # header claims 81 M pixels, no data
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": "|u1", "fortran_order": False, "shape": (1, 9000, 9000)})
        return "x.npy", buf.getvalue() + bytes(64), {}, "max_image_pixels"
    if kind == "npy_truncated":
        buf = io.BytesIO()
        np.save(buf, rng.random((3, 8, 8)).astype(np.float32))
        return "x.npy", buf.getvalue()[:-10], {}, "truncated"
    if kind == "npy_empty":
        return "x.npy", b"", {}, "empty"
    if kind in ("fifo", "directory"):  # made by the caller; a FIFO must not block the reader
        return "x.png", None, {}, "not a regular file"
    raise AssertionError(kind)


BAD_IMAGES = ["corrupt_png", "truncated_png", "corrupt_jpeg", "truncated_jpeg", "empty_file",
              "zero_size_png", "not_an_allowed_format", "header_over_max_image_pixels",
              "pil_bomb_error", "pil_bomb_warning", "low_max_image_pixels",
              "over_max_image_bytes", "npy_header_over_max_image_pixels", "npy_truncated",
              "npy_empty", "fifo", "directory"]


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_bad_image_files_are_skippable_row_errors(data_dir, kind):
    pytest.importorskip("PIL.Image")
    d, _, _ = data_dir
    name, data, options, phrase = _bad_image(kind, d)
    if kind == "fifo":
        os.mkfifo(d / "imgs" / name)
    elif kind == "directory":
        (d / "imgs" / name).mkdir()
    else:
        (d / "imgs" / name).write_bytes(data)
    bad_row = {"question": "q", "answer": "1", "images": ["imgs/a.npy", f"imgs/{name}"]}
    path = _write_jsonl(d / "img.jsonl", [GOOD, bad_row, {**GOOD, "id": "z"}])
    with pytest.raises(RowError) as e:
        read_jsonl(path, **options)
    _assert_row_error(e.value, path, 2, "images[1]")
    assert name in str(e.value) and phrase in str(e.value)
    samples, stats = read_jsonl(path, skip_bad_rows=True, **options)
    assert len(samples) == 2 and stats.rows_skipped == 1
    assert stats.skipped_by_reason == {"images": 1}


def _read_one_image(d, name):
    path = _write_jsonl(d / "one.jsonl", [{"question": "q", "answer": "1",
                                           "images": [f"imgs/{name}"]}])
    return read_jsonl(path)[0][0].image


def test_image_modes_alpha_palette_cmyk_16bit_exif(data_dir):
    pil = pytest.importorskip("PIL.Image")
    d, _, _ = data_dir
    rng = np.random.default_rng()
    # RGBA: composited on white, c * a + 1 * (1 - a)
    rgba = rng.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    (d / "imgs" / "rgba.png").write_bytes(_png_bytes(pil.fromarray(rgba, "RGBA")))
    c, a = rgba[..., :3].astype(np.float64) / 255, rgba[..., 3:].astype(np.float64) / 255
    want = (c * a + (1 - a)).transpose(2, 0, 1)
    np.testing.assert_allclose(_read_one_image(d, "rgba.png"), want, atol=1e-6)
    # LA: one channel, composited on white
    la = rng.integers(0, 256, size=(5, 6, 2), dtype=np.uint8)
    (d / "imgs" / "la.png").write_bytes(_png_bytes(pil.fromarray(la, "LA")))
    g, a = la[..., 0].astype(np.float64) / 255, la[..., 1].astype(np.float64) / 255
    np.testing.assert_allclose(_read_one_image(d, "la.png"), (g * a + (1 - a))[None], atol=1e-6)
    # palette with a transparent index: that index becomes white, the others their colour
    idx = rng.integers(0, 4, size=(5, 6), dtype=np.uint8)
    idx[0, 0] = 0
    palette = rng.integers(0, 256, size=(4, 3), dtype=np.uint8)
    im = pil.fromarray(idx, "P")
    im.putpalette(palette.flatten().tolist())
    (d / "imgs" / "p.png").write_bytes(_png_bytes(im, transparency=0))
    want = palette[idx].astype(np.float64).transpose(2, 0, 1) / 255
    want[:, idx == 0] = 1.0
    np.testing.assert_allclose(_read_one_image(d, "p.png"), want, atol=1e-6)
    # 16-bit grayscale: scaled by 65535, never clipped at 255
    g16 = rng.integers(0, 65536, size=(5, 6), dtype=np.uint16)
    g16[0, 0], g16[0, 1] = 0, 65535
    (d / "imgs" / "g16.png").write_bytes(_png_bytes(pil.fromarray(g16)))
    np.testing.assert_allclose(_read_one_image(d, "g16.png"),
                               g16[None].astype(np.float64) / 65535, atol=1e-6)
    # CMYK (JPEG): Pillow's CMYK -> RGB conversion, three channels
    cmyk = pil.fromarray(rng.integers(0, 256, size=(8, 8, 4), dtype=np.uint8), "CMYK")
    cmyk.save(d / "imgs" / "cmyk.jpg", quality=95)
    with pil.open(d / "imgs" / "cmyk.jpg") as im:
        want = np.asarray(im.convert("RGB")).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(_read_one_image(d, "cmyk.jpg"), want, atol=1e-6)
    # EXIF orientation 6 (rotate 90 degrees clockwise to display) is applied
    gray = rng.integers(0, 256, size=(4, 7), dtype=np.uint8)
    exif = pil.Exif()
    exif[0x0112] = 6
    (d / "imgs" / "exif.png").write_bytes(_png_bytes(pil.fromarray(gray), exif=exif))
    out = _read_one_image(d, "exif.png")
    assert out.shape == (1, 7, 4)
    np.testing.assert_allclose(out[0], np.rot90(gray, k=-1) / 255, atol=1e-6)
    # load_image, the public helper, bounds too
    with pytest.raises(ValueError, match="max_image_pixels"):
        load_image("imgs/exif.png", d, max_image_pixels=27)


# ---------------------------------------------------------------- 3. paths outside the data folder
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_image_paths_must_stay_in_the_data_folder(tmp_path, how):
    (tmp_path / "data").mkdir()
    (tmp_path / "outside").mkdir()
    img = np.random.default_rng().random((1, 4, 4)).astype(np.float32)
    np.save(tmp_path / "outside" / "o.npy", img)
    if how == "dotdot":
        entry = "../outside/o.npy"
    elif how == "absolute":
        entry = str(tmp_path / "outside" / "o.npy")
    else:
        os.symlink(tmp_path / "outside" / "o.npy", tmp_path / "data" / "link.npy")
        entry = "link.npy"
    path = _write_jsonl(tmp_path / "data" / "d.jsonl",
                        [GOOD, {"question": "q", "answer": "1", "images": [entry]}])
    with pytest.raises(RowError) as e:
        read_jsonl(path)
    _assert_row_error(e.value, path, 2, "images[0]")
    assert repr(entry) in str(e.value) and "allow_paths_outside_data_dir" in str(e.value)
    assert read_jsonl(path, skip_bad_rows=True)[1].rows_skipped == 1
    samples, _ = read_jsonl(path, allow_paths_outside_data_dir=True)
    np.testing.assert_array_equal(samples[1].image, img)


def test_absolute_path_inside_the_data_folder_is_fine(data_dir):
    d, a, _ = data_dir
    path = _write_jsonl(d / "abs.jsonl", [{"question": "q", "answer": "1",
                                           "images": [str(d / "imgs" / ".." / "imgs" / "a.npy")]}])
    np.testing.assert_array_equal(read_jsonl(path)[0][0].image, a)


# ---------------------------------------------------------------- 4. undecodable JSON Lines
HOSTILE_LINES = [  # (line bytes, field, options)
    (b'{"question": "caf\xe9", "answer": "1"}', "<utf-8>", {}),
    (b'{"question": "q", "answer": "1", "n": ' + b"9" * 5000 + b"}", "n", {}),
    (b'{"question": "q", "answer": "1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "<json>", {}),
    (b'{"question": "q", "answer": "1", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "x", {}),
    (b'{"question": "q", "answer": "1", "pad": "' + b"x" * 2000 + b'"}', "<row>",
     {"max_line_bytes": 1024}),
    (b'{"question": "q", "answer": "1", "answer": "2"}', "answer", {}),
    (b'{"question": "q", "answer": "1", "n": {"m": 12345678901}}', "n", {"max_int_digits": 10}),
]


@pytest.mark.parametrize("line,fld,options", HOSTILE_LINES,
                         ids=["latin1", "int_5000_digits", "depth_100000", "depth_41",
                              "line_too_long", "duplicate_key", "int_over_max_int_digits"])
def test_hostile_json_lines_are_skippable_row_errors(tmp_path, line, fld, options):
    path = _write_jsonl_bytes(tmp_path / "h.jsonl",
                              [json.dumps(GOOD).encode(), line, json.dumps(GOOD).encode()])
    with pytest.raises(RowError) as e:
        read_jsonl(path, **options)
    _assert_row_error(e.value, path, 2, fld)
    samples, stats = read_jsonl(path, skip_bad_rows=True, **options)
    assert [s.uid for s in samples] == ["h.jsonl:1", "h.jsonl:3"]
    assert stats.rows_total == 3 and stats.rows_skipped == 1


def test_jsonl_utf8_bom_and_crlf_are_fine(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n"
                     + json.dumps({"question": "caf\u00e9", "answer": "2"}).encode() + b"\r\n")
    samples, _ = read_jsonl(path)
    assert [s.question for s in samples] == ["q", "caf\u00e9"]


# ---------------------------------------------------------------- 5. corrupt Parquet
def _parquet_bytes(n_rows=6, row_group_size=2):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"question": [f"q{i}" for i in range(n_rows)],
                      "answer": [str(i) for i in range(n_rows)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, use_dictionary=False,
                   compression="none")
    return buf.getvalue()


@pytest.mark.parametrize("how", ["empty", "truncated", "bad_magic", "bad_footer"])
def test_corrupt_parquet_file_is_one_clear_error(tmp_path, how):
    data = _parquet_bytes()
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[:len(data) // 2]
    elif how == "bad_magic":
        data = data[:-4] + b"XXXX"
    else:
        footer_len = struct.unpack("<I", data[-8:-4])[0]
        data = data[:-8 - footer_len] + b"\xff" * footer_len + data[-8:]
    path = tmp_path / "c.parquet"
    path.write_bytes(data)
    for skip in (False, True):
        with pytest.raises(ValueError) as e:
            read_parquet(path, skip_bad_rows=skip)
        assert str(path) in str(e.value) and "cannot open" in str(e.value)
        assert not isinstance(e.value, RowError)


def test_corrupt_parquet_row_group_is_skippable_row_errors(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    data = bytearray(_parquet_bytes(n_rows=6, row_group_size=2))
    col = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(1).column(0)
    start = col.data_page_offset
    data[start:start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path = tmp_path / "g.parquet"
    path.write_bytes(bytes(data))
    with pytest.raises(RowError) as e:
        read_parquet(path)
    assert str(path) in str(e.value) and "rows 3-4" in str(e.value)
    assert "row group 2 of 3" in str(e.value)
    samples, stats = read_parquet(path, skip_bad_rows=True)
    assert [s.question for s in samples] == ["q0", "q1", "q4", "q5"]
    assert [s.uid for s in samples] == ["g.parquet:1", "g.parquet:2", "g.parquet:5", "g.parquet:6"]
    assert stats.rows_total == 6 and stats.rows_skipped == 2 and len(stats.errors) == 1
    assert sum(stats.skipped_by_reason.values()) == 2


@pytest.mark.parametrize("column,values,fld", [
    ("answer", [["1"], ["2"]], "answer"),
    ("question", [b"q", b"r"], "question"),
    ("id", [[1], [2]], "id"),
    ("uid", [0.5, 1.5], "uid"),
    ("images", ["imgs/a.npy", "imgs/a.npy"], "images"),
    ("images", [[1], [2]], "images[0]"),
    ("verifiable", [1, 0], "verifiable"),
])
def test_parquet_wrong_column_types_are_row_errors(data_dir, column, values, fld):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    d, _, _ = data_dir
    cols = {"question": ["q1", "q2"], "answer": ["1", "2"], column: values}
    pq.write_table(pa.table(cols), d / "w.parquet")
    with pytest.raises(RowError) as e:
        read_parquet(d / "w.parquet")
    _assert_row_error(e.value, d / "w.parquet", 1, fld)


# ---------------------------------------------------------------- 6. too few usable rows
@pytest.mark.parametrize("how", ["empty", "blank_lines", "all_bad", "below_min_rows",
                                 "empty_parquet"])
def test_too_few_usable_rows_is_an_error(tmp_path, how):
    options = {"skip_bad_rows": True}
    if how == "empty":
        path = tmp_path / "e.jsonl"
        path.write_bytes(b"")
    elif how == "blank_lines":
        path = _write_jsonl(tmp_path / "e.jsonl", ["", "  "])
    elif how == "all_bad":
        path = _write_jsonl(tmp_path / "e.jsonl", [{"answer": "1"}, "{no", {"question": "q"}])
    elif how == "below_min_rows":
        path = _write_jsonl(tmp_path / "e.jsonl", [GOOD, {"answer": "1"}])
        options["min_rows"] = 2
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        path = tmp_path / "e.parquet"
        pq.write_table(pa.table({"question": pa.array([], pa.string()),
                                 "answer": pa.array([], pa.string())}), path)
    with pytest.raises(ValueError) as e:
        read_samples(path, **options)
    msg = str(e.value)
    assert str(path) in msg and "min_rows" in msg
    if how == "all_bad":
        assert "3 skipped" in msg and "row 1" in msg and "field 'question'" in msg
    if how == "below_min_rows":
        assert "1 usable row" in msg and "row 2" in msg


# ---------------------------------------------------------------- 7. the read summary
def test_read_stats_count_reasons_cap_errors_and_log_one_line(data_dir, reader_log):
    d, _, _ = data_dir
    rows = [GOOD, {**GOOD, "id": "a"}, {**GOOD, "id": "a"}, "{x",
            {**GOOD, "images": ["imgs/none.npy"]}, {**GOOD, "images": ["imgs/a.txt"]}]
    rows += [{"answer": str(i)} for i in range(30)]
    path = _write_jsonl(d / "r.jsonl", rows)
    samples, stats = read_jsonl(path, skip_bad_rows=True)
    assert len(samples) == stats.rows_read == 2
    assert stats.rows_total == 36 and stats.rows_skipped == 34
    assert stats.skipped_by_reason == {"duplicate id": 1, "invalid JSON": 1, "images": 2,
                                       "question": 30}
    assert len(stats.errors) == readers.MAX_REPORTED_ERRORS < 34
    assert "row 3" in stats.errors[0] and "row 4" in stats.errors[1]
    lines = [r.getMessage() for r in reader_log if r.levelno == logging.WARNING]
    assert len(lines) == 1
    assert "skipped 34 of 36 rows" in lines[0] and "question: 30" in lines[0]
    assert "duplicate id: 1" in lines[0] and "row 3" in lines[0]


# ---------------------------------------------------------------- 8. bad text
BAD_TEXT = [  # (row as JSON text, field, options)
    ('{"question": "q", "answer": 1' + "0" * 5000 + "}", "answer", {}),
    ('{"question": "a\\u0000b", "answer": "1"}', "question", {}),
    ('{"question": "a\\u001bb", "answer": "1"}', "question", {}),
    ('{"question": "a\\ud800b", "answer": "1"}', "question", {}),
    ('{"question": "q", "answer": "1\\u0000"}', "answer", {}),
    ('{"question": "q", "answer": "1", "reasoning": "r\\u0007"}', "reasoning", {}),
    ('{"question": "q", "answer": "1", "topic": "t\\u0000"}', "topic", {}),
    ('{"question": "q", "answer": "1", "uid": "u\\u0000"}', "uid", {}),
    (json.dumps({"question": "x" * 100_001, "answer": "1"}), "question", {}),
    (json.dumps({"question": "x" * 11, "answer": "1"}), "question", {"max_text_chars": 10}),
    (json.dumps({"question": "q", "answer": "1", "reasoning": "r" * 21}), "reasoning",
     {"max_reasoning_chars": 20}),
    (json.dumps({"question": "q", "answer": "1", "id": 1.5}), "id", {}),
    (json.dumps({"question": "q", "answer": "1", "id": [1]}), "id", {}),
]


@pytest.mark.parametrize("row,fld,options", BAD_TEXT,
                         ids=["answer_5000_digits", "question_nul", "question_esc",
                              "question_surrogate", "answer_nul", "reasoning_bel", "topic_nul",
                              "uid_nul", "question_100001", "question_over_cap",
                              "reasoning_over_cap", "id_float", "id_list"])
def test_bad_text_is_a_row_error(tmp_path, row, fld, options):
    path = _write_jsonl(tmp_path / "t.jsonl", [GOOD, row])
    with pytest.raises(RowError) as e:
        read_jsonl(path, **options)
    _assert_row_error(e.value, path, 2, fld)
    assert read_jsonl(path, skip_bad_rows=True, **options)[1].rows_skipped == 1


def test_text_at_the_limits_is_fine(tmp_path):
    rows = [{"question": "x" * 10, "answer": "1", "reasoning": "a\tb\nc\r\n"},
            {"question": "q", "answer": 10 ** 4299, "id": 10 ** 40}]
    path = _write_jsonl(tmp_path / "ok.jsonl", rows)
    samples, _ = read_jsonl(path, max_text_chars=4300)
    assert samples[0].reasoning == "a\tb\nc\r\n" and samples[1].answer == str(10 ** 4299)
    assert samples[1].uid == str(10 ** 40)

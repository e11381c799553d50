"""VLMEvalKit TSV reading and writing (base64 images, index references, image lists) and MCQ prompts."""

import base64
import csv
import io

import pytest
from PIL import Image

from internvl.errors import DataError
from internvl.eval.items import EvalItem, ImageSource, dump_images
from internvl.eval.prompts import build_mcq_prompt, build_vqa_prompt
from internvl.eval.tsv import read_tsv, write_tsv


def png_b64(color, size=(4, 3), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


RED, BLUE = png_b64((255, 0, 0)), png_b64((0, 0, 255), size=(2, 5))
HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split",
          "image"]


def row(index, image, question="q", answer="A"):
    """A two-option row with empty hint, C and D."""
    return [index, question, "", "a", "b", "", "", answer, "c", "l", "dev", image]


def write(tmp_path, rows, header=HEADER, name="bench.tsv"):
    path = tmp_path / name
    lines = ["\t".join(header)] + ["\t".join(str(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_options_answer_and_decodes_image(tmp_path):
    cells = [1, "What color?", "", "red", "blue", "", "nan", "A", "color", "perception", "dev", RED]
    path = write(tmp_path, [cells])
    (item,) = read_tsv(path)
    assert item.index == 1 and item.question == "What color?"
    assert item.hint is None  # empty cell is NaN for pandas
    assert item.options == {"A": "red", "B": "blue"}  # empty C and "nan" D are missing options
    assert (item.answer, item.category, item.l2_category, item.split) == ("A", "color", "perception", "dev")
    img = item.images[0].load()
    assert img.size == (4, 3) and img.getpixel((0, 0)) == (255, 0, 0)


def test_reads_pandas_quote_all_output_with_bom_and_crlf(tmp_path):
    # VLMEvalKit's dump() writes TSVs with pandas' QUOTE_ALL; files made on Windows may carry a BOM and CRLF.
    path = tmp_path / "quoted.tsv"
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        writer.writerow(HEADER)
        writer.writerow([3, 'Say "hi"\tor not', "", "yes", "no", "", "", "B", "c", "l", "dev", RED])
    (item,) = read_tsv(path)
    assert (item.index, item.question, item.options, item.answer) == \
        (3, 'Say "hi"\tor not', {"A": "yes", "B": "no"}, "B")


def test_pandas_na_tokens_drop_options(tmp_path):
    # pandas reads "None", "NA", "null" as NaN too, so VLMEvalKit never shows such options.
    path = write(tmp_path, [[1, "q", "h", "x", "None", "NA", "null", "A", "c", "l", "dev", RED]])
    assert read_tsv(path)[0].options == {"A": "x"}


def test_index_reference_reuses_image(tmp_path):
    path = write(tmp_path, [
        row(10, RED, question="q1", answer="A"),
        row(11, "10", question="q2", answer="B"),
    ])
    first, second = read_tsv(path)
    assert second.images[0].data is first.images[0].data  # the same string, not a copy
    assert second.images[0].load().getpixel((0, 0)) == (255, 0, 0)


def test_reference_to_missing_index_names_row(tmp_path):
    path = write(tmp_path, [
        row(10, RED, question="q1", answer="A"),
        row(11, "99", question="q2", answer="B"),
    ])
    with pytest.raises(DataError, match=r"bench\.tsv, row 2 \(line 3\), column 'image': '99' is an index"):
        read_tsv(path)


def test_list_of_images_with_names(tmp_path):
    header = ["index", "question", "A", "B", "answer", "image", "image_path"]
    names = "['1_0.jpg', '1_1.jpg']"
    cells = [1, "Which differs?", "first", "second", "B", repr([RED, BLUE]), names]
    path = write(tmp_path, [cells], header=header)
    (item,) = read_tsv(path)
    assert [s.name for s in item.images] == ["1_0.jpg", "1_1.jpg"]
    assert [s.load().size for s in item.images] == [(4, 3), (2, 5)]
    dumped = dump_images(item, tmp_path / "images")
    assert [p.name for p in dumped] == ["1_0.jpg", "1_1.jpg"] and all(p.exists() for p in dumped)
    # without names: <index>.png for one image, <index>_<k>.png for several (VLMEvalKit's dump_image)
    item.images = [type(s)(data=s.data) for s in item.images]
    assert [p.name for p in dump_images(item, tmp_path / "unnamed")] == ["1_0.png", "1_1.png"]
    item.images = item.images[:1]
    assert [p.name for p in dump_images(item, tmp_path / "unnamed")] == ["1.png"]


def test_image_path_only_reads_files(tmp_path):
    Image.new("RGB", (3, 3), (0, 255, 0)).save(tmp_path / "g.png")
    header = ["index", "question", "A", "B", "answer", "image_path"]
    path = write(tmp_path, [[1, "q", "x", "y", "A", "g.png"]], header=header)
    assert read_tsv(path)[0].images[0].load().getpixel((1, 1)) == (0, 255, 0)


def test_rows_without_image_are_skipped_by_default(tmp_path):
    path = write(tmp_path, [
        row(1, RED, question="q1", answer="A"),
        row(2, "", question="q2", answer="A"),
    ])
    assert [it.index for it in read_tsv(path)] == [1]
    assert [it.images for it in read_tsv(path, skip_noimg=False)][1] == []


def test_bad_base64_names_row_and_column(tmp_path):
    path = write(tmp_path, [row(1, "not*base64" * 10)])
    with pytest.raises(DataError, match=r"row 1 \(line 2\), column 'image': not valid base64"):
        read_tsv(path)


def test_valid_base64_that_is_not_an_image_fails_on_load(tmp_path):
    junk = base64.b64encode(b"hello, not an image" * 10).decode()
    path = write(tmp_path, [row(1, junk)])
    (item,) = read_tsv(path)  # decoding is lazy
    with pytest.raises(DataError, match=r"row 1 \(line 2\), column 'image': not a decodable base64 image"):
        item.images[0].load()


def test_missing_required_column(tmp_path):
    path = write(tmp_path, [[1, "a", "b", "A"]], header=["index", "A", "B", "answer"])
    with pytest.raises(DataError, match=r"bench\.tsv, row 0 \(header, line 1\), column 'question': missing"):
        read_tsv(path)


def test_malformed_row_and_empty_index(tmp_path):
    path = write(tmp_path, [[1, "q", "", "a", "b", "", "", "A", "c", "l", "dev"]])  # one field short
    with pytest.raises(DataError, match=r"row 1 \(line 2\), column 'image': row has 11 fields, header has"):
        read_tsv(path)
    path = write(tmp_path, [row("", RED)])
    with pytest.raises(DataError, match=r"row 1 \(line 2\), column 'index': required value is empty"):
        read_tsv(path)


def test_duplicate_index(tmp_path):
    path = write(tmp_path, [row(5, RED), row(5, RED)])
    with pytest.raises(DataError, match=r"row 2 \(line 3\), column 'index': duplicate index '5' \(first on"):
        read_tsv(path)


def test_write_read_round_trip_dedups_images(tmp_path):
    red = ImageSource(data=RED)
    items = [
        EvalItem(index=1, question="Tab\there, quote \"x\"\nand newline", options={"A": "a", "B": "b"},
                 answer="B", hint="look", category="c", images=[red]),
        EvalItem(index=2, question="same image", options={"A": "a", "B": "b", "C": "c"}, answer="C",
                 images=[red]),
        EvalItem(index=3, question="two images", options={"A": "a", "B": "b"}, answer="A",
                 images=[ImageSource.from_image(Image.new("RGB", (2, 2), (0, 0, 255))), red]),
    ]
    path = tmp_path / "out.tsv"
    write_tsv(path, items)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert rows[0]["image"] == RED and rows[1]["image"] == "1"  # row 2 stores a reference to row 1
    back = read_tsv(path)
    assert [(it.index, it.question, it.options, it.answer) for it in back] == \
        [(it.index, it.question, it.options, it.answer) for it in items]
    assert back[0].hint == "look" and back[1].hint is None
    assert back[1].images[0].load().getpixel((0, 0)) == (255, 0, 0)
    assert [s.load().size for s in back[2].images] == [(2, 2), (4, 3)]


def test_write_refuses_values_pandas_would_drop(tmp_path):
    item = EvalItem(index=1, question="q", options={"A": "x", "B": "None"}, answer="B")
    with pytest.raises(DataError, match=r"row 1, column 'B': value 'None' would be read back as missing"):
        write_tsv(tmp_path / "x.tsv", [item])


def test_palette_and_alpha_images_become_rgb(tmp_path):
    path = write(tmp_path, [row(1, png_b64((1, 2, 3, 4), mode="RGBA"))])
    assert read_tsv(path)[0].images[0].load().mode == "RGB"


ITEM = EvalItem(index=1, question="What is shown?", hint="A photo.", options={"A": "cat", "B": "dog"})


def test_internvl_mcq_prompt_golden():
    assert build_mcq_prompt(ITEM) == (
        "A photo.\nWhat is shown?\nA. cat\nB. dog\n"
        "Answer with the option's letter from the given choices directly."
    )
    no_hint = EvalItem(index=2, question="图中是什么?", options={"A": "猫", "B": "狗"})
    assert build_mcq_prompt(no_hint) == "图中是什么?\nA. 猫\nB. 狗\n请直接回答选项字母。"
    assert build_mcq_prompt(EvalItem(index=3, question="Why?")) == "Why?\nAnswer the question directly."
    cot = build_mcq_prompt(ITEM, cot=True)
    assert cot.startswith("A photo.\nWhat is shown?\nA. cat\nB. dog\nAnswer the preceding multiple choice")


def test_vlmeval_mcq_prompt_golden():
    assert build_mcq_prompt(ITEM, style="vlmeval") == (
        "Hint: A photo.\nQuestion: What is shown?\nOptions:\nA. cat\nB. dog\n"
        "Please select the correct answer from the options above. \n"
    )
    with pytest.raises(ValueError, match="unknown MCQ prompt style 'llava'"):
        build_mcq_prompt(ITEM, style="llava")


def test_vqa_prompt():
    assert build_vqa_prompt("What year?") == "What year?\nAnswer the question using a single word or phrase."
    assert build_vqa_prompt("Is it red?", sep=" ") == \
        "Is it red? Answer the question using a single word or phrase."


# ---- hostile files: decompression bombs and bytes that are not UTF-8 (issue 21) ----------------------------


def png_header_only(width, height):
    """A PNG that claims width x height pixels (1-bit grey) and holds no pixel data: a bomb's header (with a
    comment, so that its base64 is longer than an index reference)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    comment = chunk(b"tEXt", b"Comment\0" + b"x" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + comment + chunk(b"IEND", b"")


# 9000^2 is above the project's 64 MP limit, 10000^2 in PIL's warning band, 30000^2 beyond PIL's own error limit
BOMBS = [((9000, 9000), "above the limit of 64000000"), ((10000, 10000), "decompression bomb"),
         ((30000, 30000), "decompression bomb")]  # fmt: skip


@pytest.mark.parametrize("size, message", BOMBS)
def test_a_base64_bomb_is_one_line_naming_row_and_column(tmp_path, size, message):
    bomb = base64.b64encode(png_header_only(*size)).decode()
    path = write(tmp_path, [row(1, RED), row(2, bomb)])
    items = read_tsv(path)
    assert items[0].images[0].load().size == (4, 3)
    with pytest.raises(DataError) as e:
        items[1].images[0].load()
    text = str(e.value)
    assert text.startswith(f"{path}, row 2 (line 3), column 'image': not a decodable base64 image (")
    assert message in text and "\n" not in text


def test_a_bomb_image_file_is_one_line_naming_row_and_file(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_only(30000, 30000))
    path = write(tmp_path, [[1, "q", "a", "b", "A", "bomb.png"]],
                 header=["index", "question", "A", "B", "answer", "image_path"])  # fmt: skip
    (item,) = read_tsv(path)
    with pytest.raises(DataError) as e:
        item.images[0].load()
    text = str(e.value)
    assert text.startswith(f"{path}, row 1 (line 2), column 'image_path': cannot read image file ")
    assert "bomb.png" in text and "decompression bomb" in text and "\n" not in text


@pytest.mark.parametrize("where, message", [
    ("question", "row 2 (line 3), column 'question': invalid UTF-8 (byte 0xff at character 4)"),
    ("header", "row 0 (header, line 1), column #2: invalid UTF-8 (byte 0xe9 at character 8)"),
])  # fmt: skip
def test_bytes_that_are_not_utf8_are_one_line_naming_row_and_column(tmp_path, where, message):
    path = write(tmp_path, [row(1, RED), row(2, RED, question="what")])
    data = path.read_bytes()
    if where == "question":
        data = data.replace(b"\twhat\t", b"\twhat\xff?\t")
    else:
        data = data.replace(b"\tquestion\t", b"\tquestion\xe9\t")
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
        read_tsv(path)
    assert str(e.value) == f"{path}, {message}; VLMEvalKit TSV files are UTF-8"


def test_utf8_text_and_a_byte_order_mark_still_read(tmp_path):
    path = write(tmp_path, [row(1, RED, question="Qu'est-ce que c'est ? 这是什么 \u00e9")])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    (item,) = read_tsv(path)
    assert item.question == "Qu'est-ce que c'est ? 这是什么 \u00e9" and item.index == 1

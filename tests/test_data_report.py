import pandas as pd
from PIL import Image

from kennel.data.manifest import account
from kennel.data.report import COUNTS_FILE, DATA_FIGURES, sample_rejects, write_data_report
from kennel.data.sources import find_images
from kennel.data.synthetic import render
from kennel.data.validate import inspect_all


def test_the_data_report_lists_every_class_and_shows_the_rejects(tmp_path):
    raw = tmp_path / "raw"
    for label, n in (("cat", 6), ("dog", 4), ("owl", 0)):
        (raw / label).mkdir(parents=True)
        for i in range(n):
            render(label if label != "owl" else "cat", 0, i).resize((64 + 8 * i, 64)).save(raw / label / f"{i}.jpg")
    (raw / "owl" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 no more")
    render("dog", 0, 9).resize((16, 16)).save(raw / "dog" / "tiny.png")
    (raw / "cat" / "empty.jpg").write_bytes(b"")
    candidates = find_images("folder", raw)
    acc = account(candidates, inspect_all(candidates, 32, 10**8), tmp_path, 0.25, 0.25, 0)

    files = write_data_report(acc.manifest, acc.rejects, acc.summary, tmp_path, tmp_path / "report", 0, 10**8)
    assert sorted(f.name for f in files) == sorted([COUNTS_FILE, *DATA_FIGURES])
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:4] == b"\x89PNG" and Image.open(f).size[0] > 300
    counts = pd.read_csv(tmp_path / "report" / COUNTS_FILE).set_index("label")
    assert counts.index.tolist() == ["cat", "dog", "owl"]  # a class that kept nothing is listed too
    assert counts.loc["cat", "kept"] == 6 and counts.loc["dog", "kept"] == 4 and counts.loc["owl", "kept"] == 0
    assert counts[["found", "rejected"]].loc["owl"].tolist() == [1, 1]
    assert (counts["train"] + counts["val"] + counts["test"] == counts["kept"]).all()
    assert counts["found"].sum() == acc.summary["found"] and counts["rejected"].sum() == len(acc.rejects)


def test_the_reject_sample_takes_every_reason_in_turn():
    rejects = pd.DataFrame({"path": [f"{i}.jpg" for i in range(12)], "label": "cat",
                            "reason": ["empty file"] * 10 + ["too small", "duplicate"], "detail": ""})
    sample = sample_rejects(rejects, 4)
    assert sample["reason"].tolist() == ["duplicate", "empty file", "too small", "empty file"]
    assert len(sample_rejects(rejects, 50)) == 12 and sample_rejects(rejects.iloc[:0], 5).empty

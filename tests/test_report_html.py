"""The HTML report renders in headless Chromium: tables present, every image decoded, screenshot saved.

The page itself carries no script. The test loads a copy with a small probe appended that, on the
window's load event, writes into the DOM how many images decoded (``naturalWidth > 0``); Chromium's
``--dump-dom`` then shows the probe's marker. A copy with a corrupt image proves the probe can fail.
The screenshot is kept in $CGH_TEST_ARTIFACTS (default: pytest's tmp dir).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from _helpers_reports import full_demo_like
from reports.cli import make_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package 'chromium') not installed")

PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var m = document.createElement('div');
  m.id = 'probe';
  m.setAttribute('data-images', imgs.length);
  m.setAttribute('data-loaded', ok);
  m.setAttribute('data-tables', document.querySelectorAll('table.report').length);
  m.setAttribute('data-rows', document.querySelectorAll('table.report tbody tr').length);
  m.setAttribute('data-shownrows', Array.prototype.filter.call(document.querySelectorAll('table.report tbody tr'),
    function (r) { return r.getClientRects().length > 0; }).length);
  m.setAttribute('data-pagewidth', document.documentElement.scrollWidth);
  m.setAttribute('data-viewwidth', document.documentElement.clientWidth);
  var c = document.getElementById('table-summary');
  if (c) {
    var box = c.getBoundingClientRect();
    m.setAttribute('data-comparetop', Math.round(box.top));
    m.setAttribute('data-comparebottom', Math.round(box.bottom));
    m.setAttribute('data-compareright', Math.round(box.right));
    m.setAttribute('data-comparetext', c.innerText.replace(/[^A-Za-z0-9_ ]/g, ' '));
  }
  document.body.appendChild(m);
});
</script>
"""


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def probe(page: Path, profile: Path) -> dict[str, int]:
    html = page.read_text()
    probed = page.with_name("probed_" + page.name)
    probed.write_text(html.replace("</body>", PROBE + "</body>"))
    res = chromium(profile, "--virtual-time-budget=10000", "--window-size=1400,900", "--dump-dom", probed.as_uri())
    m = re.search(r'<div id="probe"([^>]*)>', res.stdout)
    assert m, f"probe marker missing from the DOM; chromium said: {res.stderr[-2000:]}"
    return {k: (int(v) if re.fullmatch(r"-?\d+", v) else v) for k, v in re.findall(r'data-(\w+)="([^"]*)"', m.group(1))}


def test_html_report_renders_in_chromium_with_all_tables_and_images(tmp_path):
    full_demo_like(tmp_path / "results")
    report, paths = make_report([tmp_path / "results"], tmp_path / "report", "html test")
    tables = [t for t in report.tables if t.rows]
    images = len(report.plots) + len(report.comparison_plots)
    assert (len(report.plots), len(report.comparison_plots)) == (3, 7)

    seen = probe(paths["html"], tmp_path / "profile")
    assert seen["tables"] == len(tables)
    assert seen["rows"] == sum(len(t.rows) for t in tables)
    # paper rows without a run of ours are folded away until "show all" is ticked
    folded = sum(r.kind == "paper-only" for t in tables for r in t.rows)
    assert folded > 0 and seen["shownrows"] == seen["rows"] - folded
    assert seen["images"] == images and seen["loaded"] == images

    # the probe really tells a broken image from a good one
    broken = tmp_path / "report" / "broken.html"
    html = paths["html"].read_text()
    first = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]{200})', html)
    broken.write_text(html.replace(first.group(1), "A" * 200, 1))
    assert probe(broken, tmp_path / "profile2")["loaded"] == images - 1

    shots = Path(os.environ.get("CGH_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "report_html.png"
    shot.unlink(missing_ok=True)
    res = chromium(tmp_path / "profile3", "--virtual-time-budget=10000", f"--screenshot={shot}",
                   "--window-size=1400,3000", paths["html"].as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1400, 3000)
        colours = img.convert("L").getextrema()
    assert colours[0] < 100 < colours[1]            # text and lines on a light page, not a blank image


def test_comparison_view_is_the_first_screen_and_fits_1400px(tmp_path):
    """8 checkpoints x 7 protocols: the comparison table starts near the top, ends within the first
    900 px, and the page is no wider than a 1400-px window; every checkpoint shows with its label."""
    from _helpers_reports import RecordWriter, checkpoint, epochs

    w = RecordWriter(tmp_path / "results")
    names = [f"checkpoint_{i}_long_name" for i in range(8)]
    for i, name in enumerate(names):
        ck = checkpoint(name, "unknown")
        base = 30.0 + 3 * i
        w("knn", {"top1": base, "top5": base + 20, "best_k": 20}, ck)
        w("linear", epochs(base + 5, base + 25), ck)
        w("semi", epochs(base - 10, base + 10), ck, subset="1percent")
        w("semi", epochs(base - 5, base + 15), ck, subset="10percent")
        w("voc_det", {"AP": base / 2, "AP50": base, "AP75": base / 3}, ck, dataset="synthshapes_voc",
          extra={"runs": [{"AP": base / 2, "AP50": base, "AP75": base / 3}]})
        w("coco_instseg", {"bbox_AP": base / 3, "bbox_AP50": base / 2, "bbox_AP75": base / 4, "segm_AP": base / 3,
                           "segm_AP50": base / 2, "segm_AP75": base / 4}, ck, dataset="synthshapes_coco")
        w("seg", {"mIoU": base / 2, "mAcc": base / 1.5, "aAcc": base}, ck, dataset="synthshapes_seg")
    labels = [f"label{i}" for i in range(8)]
    report, paths = make_report([tmp_path / "results"], tmp_path / "report", "fit test",
                                labels=[f"{n}={lab}" for n, lab in zip(names, labels)])
    assert len(report.summary.value_columns) == 7 and len(report.summary.rows) == 8
    # the best of each column is the last checkpoint (highest base), marked bold
    assert report.summary.best == {(7, col) for col in report.summary.value_columns}

    seen = probe(paths["html"], tmp_path / "profile")
    assert seen["pagewidth"] <= seen["viewwidth"] <= 1400, seen
    assert seen["compareright"] <= 1400 and 0 < seen["comparetop"] < 250, seen
    assert seen["comparebottom"] < 900, seen
    shown = seen["comparetext"].split()
    assert all(label in shown for label in labels), seen["comparetext"]
    assert not any(name in seen["comparetext"] for name in names)      # --label replaces the file name

    shots = Path(os.environ.get("CGH_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "report_first_screen.png"
    shot.unlink(missing_ok=True)
    res = chromium(tmp_path / "profile2", "--virtual-time-budget=10000", f"--screenshot={shot}",
                   "--window-size=1400,900", paths["html"].as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1400, 900)
        colours = img.convert("L").getextrema()
    assert colours[0] < 100 < colours[1]

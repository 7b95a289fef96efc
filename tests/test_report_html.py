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
    res = chromium(profile, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    m = re.search(r'<div id="probe"([^>]*)>', res.stdout)
    assert m, f"probe marker missing from the DOM; chromium said: {res.stderr[-2000:]}"
    return {k: int(v) for k, v in re.findall(r'data-(\w+)="(\d+)"', m.group(1))}


def test_html_report_renders_in_chromium_with_all_tables_and_images(tmp_path):
    full_demo_like(tmp_path / "results")
    report, paths = make_report([tmp_path / "results"], tmp_path / "report", "html test")
    tables = [t for t in report.tables if t.rows]
    assert len(report.plots) == 4

    seen = probe(paths["html"], tmp_path / "profile")
    assert seen["tables"] == len(tables)
    assert seen["rows"] == sum(len(t.rows) for t in tables)
    assert seen["images"] == 4 and seen["loaded"] == 4

    # the probe really tells a broken image from a good one
    broken = tmp_path / "report" / "broken.html"
    html = paths["html"].read_text()
    first = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]{200})', html)
    broken.write_text(html.replace(first.group(1), "A" * 200, 1))
    assert probe(broken, tmp_path / "profile2")["loaded"] == 3

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

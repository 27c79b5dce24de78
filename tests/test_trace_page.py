"""`servesim trace --html`: the page, opened in a real headless Chromium, shows what the trace recorded.

Driven by Selenium through the system's chromedriver (Debian: `apt-get install chromium
chromium-driver`; Python: selenium, in the test extra). Skipped, saying why, when either is
missing. Chromium runs with every background-network feature off: the page itself needs no
network (it is one self-contained file).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sim.lab.experiment import load_experiment
from sim.lab.trace import trace_cell
from sim.lab.trace_html import write_page
from sim.lab.trace_text import describe_event

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "experiments" / "trace_small.toml"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("no headless browser: needs chromium and chromedriver on PATH "
                "(Debian: apt-get install -y chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402  (only once selenium is known to be there)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1920,1080")

READ_PANEL_JS = """function readPanel(engine) {
const sec = document.querySelector(`section.panel[data-engine="${engine}"]`);
if (!sec) return null;
const tables = {};
sec.querySelectorAll("g.seq").forEach((g) => {
  tables[g.dataset.seq] = [...g.querySelectorAll("g.lblock")].map((b) => Number(b.dataset.physical));
});
const refs = {};
sec.querySelectorAll("g.pblock").forEach((g) => { if (Number(g.dataset.refs) > 0) refs[g.dataset.block] = Number(g.dataset.refs); });
const slots = {};
sec.querySelectorAll("g.slot").forEach((g) => { if (g.dataset.holder) slots[g.dataset.holder] = [Number(g.dataset.slot), Number(g.dataset.held)]; });
// Where each arrow ends, against the box of the physical block it names.
const arrows = [...sec.querySelectorAll("path.arrow")].map((p) => {
  const end = p.getPointAtLength(p.getTotalLength());
  const box = sec.querySelector(`g.pblock[data-block="${p.dataset.to}"] rect.cells`).getBBox();
  return {seq: p.dataset.seq, logical: Number(p.dataset.logical), to: Number(p.dataset.to),
          lands: end.x >= box.x - 4 && end.x <= box.x + 4 && end.y >= box.y && end.y <= box.y + box.height};
});
return {step: Number(sec.dataset.step), tables: tables, refs: refs, slots: slots, arrows: arrows,
        waiting: [...sec.querySelectorAll(".queue .chip")].map((c) => c.dataset.rid),
        events: [...sec.querySelectorAll(".events li.ev")].map((li) => li.textContent),
        frame: Number(document.body.dataset.frame), scene: document.body.dataset.scene};
}"""
READ_PANEL = READ_PANEL_JS + "\nreturn readPanel(arguments[0]);"
# Every frame in one round trip: the page's own keydown handler, fed ArrowRight events, read after each.
READ_ALL_FRAMES = READ_PANEL_JS + """
const seen = [];
document.dispatchEvent(new KeyboardEvent("keydown", {key: "Home"}));
for (let k = 0; k < arguments[0]; k++) {
  if (k) document.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowRight"}));
  seen.push({paged: readPanel("paged"), slots: readPanel("slots")});
}
return seen;
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    exp = load_experiment(SMALL)
    paged = trace_cell(exp, "paged")
    slots = trace_cell(exp, "slots")
    path = write_page(exp, tmp_path_factory.mktemp("page") / "trace.html", paged)
    return path, paged, slots


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _press(driver, *keys) -> None:
    body = driver.find_element(By.TAG_NAME, "body")
    for k in keys:
        body.send_keys(k)


def _expected_events(rec, paged=True):
    return [describe_event(e, paged, rec.refcount) for e in rec.events]


def _check_paged(seen, rec) -> None:
    assert seen["step"] == rec.step
    assert seen["tables"] == rec.tables  # every block table, block by block
    assert seen["refs"] == {str(b): n for b, n in rec.refcount.items()}
    assert seen["waiting"] == rec.waiting
    assert seen["events"] == _expected_events(rec)  # the trace's events, in its (causal) order
    for a in seen["arrows"]:
        assert rec.tables[a["seq"]][a["logical"]] == a["to"]
        assert a["lands"], f"step {rec.step}: arrow {a} does not end on block {a['to']}"
    assert len(seen["arrows"]) == sum(len(t) for t in rec.tables.values())


def test_every_frame_shows_its_step_of_the_trace(browser, traced):
    path, paged, slots = traced
    browser.get(path.as_uri())
    frames = browser.execute_script(READ_ALL_FRAMES, len(paged.records))
    assert len(frames) == len(paged.records) >= 20
    for frame, (seen, rec) in enumerate(zip(frames, paged.records)):
        assert seen["paged"]["frame"] == frame and seen["paged"]["scene"] == "scenario"
        _check_paged(seen["paged"], rec)
        # The slots panel beside it shows the slots trace's step under way at that time.
        under_way = [r for r in slots.records if r.time_s <= rec.time_s + 1e-12]
        if under_way:
            srec = under_way[-1]
            assert seen["slots"]["step"] == srec.step
            assert seen["slots"]["slots"] == {rid: [t[0], srec.held_tokens[rid]] for rid, t in srec.tables.items()}
    severe = [m for m in browser.get_log("browser") if m["level"] == "SEVERE"]
    assert not severe, severe


def test_real_key_presses_step_forwards_and_backwards(browser, traced):
    path, paged, slots = traced
    browser.get(path.as_uri())
    # The key step: the first preemption, and the blocks it freed handed on in the same step.
    first = next(r for r in paged.records if r.preempted)
    _press(browser, Keys.HOME, Keys.ARROW_RIGHT * (first.step - 1))
    seen = browser.execute_script(READ_PANEL, "paged")
    _check_paged(seen, first)
    kinds = [e.kind for e in first.events]
    assert kinds.index("no_room") < kinds.index("preempt") < kinds.index("alloc")
    assert browser.find_elements(By.CSS_SELECTOR, 'section[data-engine="paged"] rect.preempted-from')
    _press(browser, Keys.ARROW_LEFT)
    _check_paged(browser.execute_script(READ_PANEL, "paged"), paged.records[first.step - 2])
    _press(browser, Keys.END)
    last_frame = int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-frame"))
    assert last_frame >= len(paged.records) - 1
    assert browser.execute_script(READ_PANEL, "slots")["step"] == slots.records[-1].step
    _press(browser, Keys.HOME)
    _check_paged(browser.execute_script(READ_PANEL, "paged"), paged.records[0])


def test_fork_scene_shows_copy_on_write(browser, traced):
    path, _, _ = traced
    browser.get(path.as_uri() + "#scene=2&frame=1")
    _press(browser, Keys.END)
    seen = browser.execute_script(READ_PANEL, "paged")
    assert seen["scene"] == "fork"
    a, child = seen["tables"]["A"], seen["tables"]["A'"]
    assert child[:-1] == a[:-1] and child[-1] != a[-1]  # full blocks shared, the written one copied
    assert any("copy-on-write" in e for e in seen["events"])
    assert all(x["lands"] for x in seen["arrows"])
    _press(browser, "1")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-scene") == "scenario"


def test_page_is_self_contained(traced):
    html = traced[0].read_text()
    for needle in ("http://", "https://", "<link", "src="):
        assert needle not in html.replace("http://www.w3.org/2000/svg", ""), needle

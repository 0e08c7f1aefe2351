"""The MLflow UI as a person sees it: a real Hydra --multirun sweep of the evaluation stage is
logged to a scratch database, `mlflow server` serves it on loopback, and headless Chromium
(driven by selenium) expands the sweep's parent run, selects its four children, presses
"Compare" and reads each run's perplexity and quantization params off the compare page.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); skipped without."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_sweep

BROWSER = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
DRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(
        BROWSER is None or DRIVER is None,
        reason="the UI test needs Chromium and chromedriver "
        "(apt-get install chromium chromium-driver; .ci/run does this)",
    ),
]

selenium = pytest.importorskip("selenium", reason="the UI test needs selenium (the dev extra)")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 60  # the machine may be busy: generous, but every wait is explicit
BITS, GROUPS = (3, 4), (16, 32)
PARAMS = ("quant.w_bit", "quant.group_size")
# the React UI re-renders under us: an element found a moment ago may be gone, so look again
STALE = (StaleElementReferenceException,)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sweep_db(tiny_model_dir, texts, tmp_path) -> Path:
    """A real `--multirun` sweep (2 bit widths x 2 group sizes) of the evaluation stage, logged
    to ``tmp_path/mlflow.db``: one parent run, four children."""
    sweep = [
        f"quant.w_bit={','.join(map(str, BITS))}",
        f"quant.group_size={','.join(map(str, GROUPS))}",
    ]
    run_sweep("fake_quant_eval.py", sweep, tiny_model_dir, texts, tmp_path)
    return tmp_path / "mlflow.db"


@pytest.fixture
def mlflow_server(sweep_db, tmp_path):
    """`mlflow server` on the sweep's database, on 127.0.0.1 and a free port; its base URL.
    It runs in its own process group, which the finaliser ends whatever happened."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    # The server's background job runner (huey consumers, several processes) is of no use here.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{sweep_db}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "mlflow server exited:\n" + server_log(tmp_path)
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /health answer:\n" + server_log(tmp_path)
            time.sleep(0.5)
        yield base
    finally:
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def server_log(tmp_path) -> str:
    return (tmp_path / "mlflow-server.log").read_text()[-3000:]


@pytest.fixture
def browser():
    """Headless Chromium with Debian's chromedriver (nothing is downloaded)."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--window-size=1600,1000",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(DRIVER))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def sweep_runs(db: Path):
    """The sweep's parent run and its children (by run id), from the MLflow API."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("ptqflow")
    found = client.search_runs([exp.experiment_id])
    [parent] = [r for r in found if "ptqflow.session" in r.data.tags]
    children = {
        r.info.run_id: r
        for r in found
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert len(children) == len(BITS) * len(GROUPS)
    return exp.experiment_id, parent, children


def test_compare_view_shows_the_sweep(sweep_db, mlflow_server, browser, tmp_path):
    exp_id, parent, children = sweep_runs(sweep_db)
    assert parent.info.run_name.startswith("sweep eval-rtn ")
    d = browser
    shot = Path(os.environ.get("PTQFLOW_UI_SCREENSHOT") or tmp_path / "mlflow_compare.png")

    def wait(cond, what: str):
        try:
            return WebDriverWait(d, WAIT_S, ignored_exceptions=STALE).until(cond)
        except TimeoutException:
            d.save_screenshot(str(tmp_path / "failure.png"))
            body = d.find_element(By.TAG_NAME, "body").text
            pytest.fail(
                f"timed out waiting for {what} at {d.current_url}\n"
                f"page text:\n{body[:2000]}\npage source:\n{d.page_source[:3000]}\n"
                f"server log:\n{server_log(tmp_path)}\nscreenshot: {tmp_path / 'failure.png'}"
            )

    def row(run_id: str) -> str:  # one ag-grid row per run: its id is the run's id
        return f"div[role='row'][row-id='{run_id}']"

    # The experiment's runs table, opened by the link `make ui` prints: the sweep shows as one
    # parent row, its children folded in; perplexity and the quant params are columns.
    d.get(f"{mlflow_server}/#/experiments/{exp_id}/runs?viewStateShareKey=ptqflow")

    def perplexity_column(drv) -> bool:  # columns off screen are not rendered: the first one
        headers = drv.find_elements(By.CSS_SELECTOR, "[role='columnheader']")
        return any(h.text.strip().startswith("perpl") for h in headers)

    wait(perplexity_column, "perplexity as a column of the runs table")
    wait(
        EC.text_to_be_present_in_element(
            (By.CSS_SELECTOR, row(parent.info.run_id)), parent.info.run_name
        ),
        "the sweep's parent run in the runs table",
    )
    if not d.find_elements(By.CSS_SELECTOR, row(next(iter(children)))):
        expand = f"{row(parent.info.run_id)} div[col-id*='Run Name'] button"
        wait(EC.element_to_be_clickable((By.CSS_SELECTOR, expand)), "the expand button").click()
    for run_id, run in children.items():
        wait(
            EC.text_to_be_present_in_element((By.CSS_SELECTOR, row(run_id)), run.info.run_name),
            f"child run {run.info.run_name} under the parent",
        )
    # ... right under their parent: the rows that follow it are its children, and no others
    index = {
        r.get_attribute("row-id"): int(r.get_attribute("row-index"))
        for r in d.find_elements(By.CSS_SELECTOR, "div[role='row'][row-id]")
    }
    first = index[parent.info.run_id] + 1
    below = {rid for rid, i in index.items() if first <= i < first + len(children)}
    assert below == set(children), (index, parent.info.run_id, list(children))

    # Select the four children and press Compare.
    for run_id in children:
        box = f"{row(run_id)} .ag-selection-checkbox .ag-checkbox-input-wrapper"
        wait(EC.element_to_be_clickable((By.CSS_SELECTOR, box)), "a row checkbox").click()
        wait(
            EC.element_located_to_be_selected(
                (By.CSS_SELECTOR, f"{row(run_id)} .ag-selection-checkbox input")
            ),
            f"run {run_id} selected",
        )
    compare = (By.CSS_SELECTOR, "button[data-testid='runs-compare-button']")
    wait(EC.element_to_be_clickable(compare), "the Compare button").click()
    wait(EC.url_contains("/compare-runs"), "the compare-runs page")
    wait(
        EC.text_to_be_present_in_element(
            (By.TAG_NAME, "body"), f"Comparing {len(children)} Runs from 1 Experiment"
        ),
        "the compare page's title",
    )

    # The compare page's column order is that of its "Run ID:" header row.
    ids = wait(
        lambda d: d.find_elements(By.XPATH, "//tr[th[normalize-space()='Run ID:']]/th/a"),
        "the Run ID row",
    )
    columns = [a.get_attribute("href").rsplit("/", 1)[1] for a in ids]
    assert sorted(columns) == sorted(children), columns
    runs = [children[c] for c in columns]

    # Params: a table row per key, a cell per run.
    for key in PARAMS:
        cells = wait(
            lambda d, key=key: d.find_elements(By.XPATH, f"//tr[th[normalize-space()='{key}']]/td"),
            f"the {key} row",
        )
        shown = [c.get_attribute("textContent").strip() for c in cells]
        assert shown == [r.data.params[key] for r in runs], (key, shown)
    assert sorted((int(r.data.params[PARAMS[0]]), int(r.data.params[PARAMS[1]])) for r in runs) == [
        (b, g) for b in BITS for g in GROUPS
    ]

    # Metrics: a virtualized grid of names, and beside it one of values whose cells sit at the
    # same `top` as their name, with `left` by run column.
    name = wait(
        EC.presence_of_element_located(
            (By.XPATH, "//div[@role='grid']//a[normalize-space()='perplexity']")
        ),
        "the perplexity row of the metrics",
    )
    top = style_px(name.find_element(By.XPATH, "./.."), "top")
    values = name.find_element(
        By.XPATH, "./ancestor::div[@role='grid'][1]/following::div[@role='grid'][1]"
    )

    def perplexity_cells(_):
        found = [
            e
            for e in values.find_elements(By.XPATH, "./div/div[@style]")
            if style_px(e, "top") == top
        ]
        if len(found) != len(runs):
            return False
        return sorted(found, key=lambda e: style_px(e, "left"))

    cells = wait(perplexity_cells, "a perplexity value for each run")
    shown = [c.get_attribute("textContent").strip() for c in cells]
    for text, run in zip(shown, runs, strict=True):
        value = run.data.metrics["perplexity"]
        assert re.fullmatch(r"-?\d+(\.\d+)?", text), (text, value)
        # the UI rounds (52.0151 -> "52.02"): equal up to half a unit of its last digit
        decimals = len(text.partition(".")[2])
        assert abs(float(text) - value) <= 0.5 * 10**-decimals + 1e-9, (run.info.run_name, text)

    # A picture of the compare view as a person would leave it: the assistant's side panel
    # closed, the params table down to the swept ones ("Show diff only"), the window tall
    # enough for the plot, the params and the metrics.
    assistant_close = "button[aria-label='Close'][data-component-id$='chat_panel.close']"
    for close in d.find_elements(By.CSS_SELECTOR, assistant_close):
        if close.is_displayed():
            close.click()
    diff_only = (By.CSS_SELECTOR, "button[aria-label='Parameters - Show diff only']")
    wait(EC.element_to_be_clickable(diff_only), "the params' Show diff only switch").click()
    wait(
        lambda d: not d.find_elements(By.XPATH, "//tr[th[normalize-space()='eval.seqlen']]"),
        "the params table down to the swept params",
    )
    d.set_window_size(1600, 1800)
    title = d.find_element(By.XPATH, "//*[text()[starts-with(normalize-space(), 'Comparing ')]]")
    d.execute_script("arguments[0].scrollIntoView({block: 'start'})", title)
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert d.save_screenshot(str(shot)), shot
    print(f"compare view: {shot}")


def style_px(element, prop: str) -> float:
    """A `prop: Npx` from the element's inline style (react-virtualized places cells so)."""
    m = re.search(rf"(?:^|;)\s*{prop}:\s*(-?[\d.]+)px", element.get_attribute("style") or "")
    return float(m.group(1)) if m else float("nan")

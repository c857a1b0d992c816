"""Screenshots of ``sparsejax compare`` in TensorBoard, taken in a real browser.

    python experiments/compare_screenshots.py                 # trains two small runs
    python experiments/compare_screenshots.py --runs A B      # or compares given runs
    python experiments/compare_screenshots.py --out docs/compare

Trains (by default) two small ``configs/gpt_sste.yaml`` runs - S-STE (A) and STE (B), four
checkpoints each - compares them, serves the comparison with TensorBoard on 127.0.0.1 and
opens the Time Series, Custom Scalars, Images, Text and HParams dashboards in headless
Chromium (Debian's ``chromium`` package, driven by Playwright) and saves one PNG each
under ``--out``. Each page is checked for what it must show (the pair's run name, the
metric charts, the summary table, the flattened hparams columns); a missing item exits
with code 1. Needs ``/usr/bin/chromium`` (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# As root on a machine with no network: no sandbox, no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SMALL = ["train.steps=40", "train.eval_every=20", "optimizer.warmup_steps=5",
         "model.n_layer=2", "data.batch_size=8", "data.max_bytes=300000",
         "checkpoint.every=10", "checkpoint.keep=10", "logging.progress=none"]
WIDTH, HEIGHT, SAVED_WIDTH = 1400, 950, 1000
TB_SETTINGS_KEY = "_tb_global_settings"
TB_SETTINGS = {"scalarSmoothing": 0, "ignoreOutliers": False,
               "timeSeriesSettingsPaneOpened": False}


@dataclass(frozen=True)
class Dashboard:
    """A TensorBoard dashboard to photograph and the texts its page must contain."""

    name: str  # the URL fragment
    must_show: tuple[str, ...]
    tag_filter: str = ""


def dashboards(pair: str) -> list[Dashboard]:
    return [
        Dashboard("timeseries", (pair, "mask_overlap", "mean"), "^(mean|mask_overlap)/"),
        Dashboard("custom_scalars", ("B vs A, all layers", "rel_distance", "mask_overlap")),
        Dashboard("images", ("overview/mask_overlap", "pattern/blocks/0/mlp/fc"),
                  "overview/mask_overlap|pattern/blocks/0/mlp/fc"),
        Dashboard("text", ("random-mask IoU", "rules.0.sparsity.method", "Layers at step")),
        Dashboard("hparams", ("a.rules.0.sparsity.method", "b.rules.0.sparsity.method",
                              "mean/mask_overlap")),
    ]


def train_pair(root: Path) -> tuple[Path, Path]:
    """Two small runs of configs/gpt_sste.yaml: S-STE (A) and STE (B)."""
    from sparsejax.config import load_config
    from sparsejax.train import run

    runs = []
    for name, method in (("sste", "sste"), ("ste", "ste")):
        cfg = load_config(REPO / "configs" / "gpt_sste.yaml",
                          [*SMALL, f"rules.0.sparsity.method={method}", f"name={name}",
                           f"run_dir={root / name}"])
        run(cfg, verbose=False)
        runs.append(root / name)
    return runs[0], runs[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(logdir: Path, port: int, timeout: float = 120.0) -> subprocess.Popen:
    """A TensorBoard server on 127.0.0.1:port that has loaded its runs."""
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as r:
                if r.read().strip() not in (b"", b"[]"):
                    return server
        except OSError:
            pass
        time.sleep(1)
    server.terminate()
    raise RuntimeError(f"tensorboard did not serve {logdir} within {timeout:.0f} s")


def _prepare(page, board: Dashboard) -> None:
    """Images: actual size. Then the tag filter, if any."""
    if board.name == "images":
        page.get_by_text("Show actual image size").first.click()
    if board.tag_filter:
        search = (page.locator("input[placeholder^='Filter tags']")  # Angular dashboards
                  .or_(page.get_by_label("Filter tags", exact=False))).first  # Polymer
        search.fill(board.tag_filter)
        search.press("Escape")  # close the autocomplete list


def photograph(url: str, boards: list[Dashboard], out: Path, settle: float = 6.0
               ) -> dict[str, list[str]]:
    """Open each dashboard, save ``out/<name>.png`` (downscaled, palette PNG) and return
    the texts each page was missing."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    missing: dict[str, list[str]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
            # TensorBoard's stored settings: no smoothing and no outlier clipping (a few
            # points per curve), the Time Series settings pane closed.
            page.add_init_script(f"localStorage.setItem('{TB_SETTINGS_KEY}', "
                                 f"'{json.dumps(TB_SETTINGS)}')")
            for board in boards:
                page.goto(f"{url}/#{board.name}")
                page.wait_for_load_state("networkidle")
                time.sleep(settle)
                _prepare(page, board)
                time.sleep(settle / 2)
                missing[board.name] = [s for s in board.must_show  # pierces shadow DOMs
                                       if not page.get_by_text(s).count()]
                shot = out / f"{board.name}.png"
                page.screenshot(path=str(shot))
                image = Image.open(shot).convert("RGB")
                image = image.resize((SAVED_WIDTH, round(image.height * SAVED_WIDTH
                                                         / image.width)), Image.LANCZOS)
                image.quantize(colors=128).save(shot, optimize=True)
        finally:
            browser.close()
    return missing


def take_screenshots(out: Path, runs: tuple[Path, Path] | None = None,
                     work: Path | None = None) -> dict[str, list[str]]:
    """Compare ``runs`` (default: two freshly trained ones), photograph the dashboards
    into ``out``; returns the texts each dashboard lacked (empty lists: all shown)."""
    from sparsejax.compare import compare_checkpoints

    work = Path(work or tempfile.mkdtemp(prefix="compare_screenshots_"))
    runs = runs or train_pair(work / "runs")
    result = compare_checkpoints(list(runs), logdir=work / "tb", name="sste_vs_ste")
    port = _free_port()
    server = serve(result.logdir, port)
    try:
        return photograph(f"http://127.0.0.1:{port}", dashboards(result.pairs[0].name), out)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs=2, type=Path, metavar=("A", "B"), default=None,
                        help="run directories to compare (default: train two small runs)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "compare",
                        help="where the PNGs go (default: %(default)s)")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"compare_screenshots: {CHROMIUM} not found (apt-get install chromium)",
              file=sys.stderr)
        return 2
    missing = take_screenshots(args.out, tuple(args.runs) if args.runs else None)
    for board, texts in missing.items():
        status = "ok" if not texts else f"MISSING {texts}"
        print(f"{board:15s} {args.out / (board + '.png')}  {status}")
    return 1 if any(missing.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

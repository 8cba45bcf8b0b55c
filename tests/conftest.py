import os

import pytest
import torch

# One compute thread for the whole run, in this process and in every subprocess a test starts (CLI runs,
# servers): the test models are tiny, and on a loaded 2-core machine a second OpenMP thread spinning at
# each op's barrier made a tiny U-Net forward ~30x slower (0.4 s -> 11 s at load average 16).
# DIFFUSEKIT_TEST_THREADS=N overrides it (e.g. to time the suite with more threads on a larger machine).
TEST_THREADS = int(os.environ.get("DIFFUSEKIT_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))
os.environ.setdefault("MKL_NUM_THREADS", str(TEST_THREADS))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread (on a loaded 2-core machine thread hand-offs cost ~20x the math)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DIFFUSEKIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="full-size check: set DIFFUSEKIT_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class _SharedBrowser:
    """One Chromium for every browser test in a row (a launch costs seconds on a loaded machine); closed
    as soon as the next test needs none, since Playwright's sync API holds an event loop on this thread
    that would break any later test's asyncio.run."""

    def __init__(self):
        self.playwright = self.browser = None

    def get(self):
        if self.browser is None:
            from server_helpers import CHROMIUM, CHROMIUM_ARGS, playwright_or_skip

            sync_api = playwright_or_skip(module_level=False)
            self.playwright = sync_api.sync_playwright().start()
            self.browser = self.playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        return self.browser

    def close(self):
        if self.browser is not None:
            try:
                self.browser.close()
            finally:
                self.playwright.stop()
                self.playwright = self.browser = None


_BROWSER = _SharedBrowser()


@pytest.fixture
def browser():
    """A real Chromium (Debian's, through Playwright), shared by consecutive browser tests."""
    return _BROWSER.get()


@pytest.fixture
def ui(browser, server):
    """A fresh page (its own browser context) on the module's `server`."""
    from server_helpers import Page

    pg = Page(browser, server.base)
    yield pg
    pg.close()


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if nextitem is None or "browser" not in nextitem.fixturenames:
        _BROWSER.close()


def pytest_sessionfinish(session):
    _BROWSER.close()


@pytest.fixture(autouse=True)
def _sigterm_handler_kept():
    """A CLI command run in-process (convert, animate) makes SIGTERM unwind; not the test process's."""
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)

"""The web demo (`make ui`), in a real browser: headless Chromium asks a question, every available system's
column fills with its streamed answer, a citation opens its passage, a document's ``<script>`` stays text, and
the missing fine-tuned adapter says which make target creates it. Also the JSON API and the CLI's refusals."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from tests.conftest import TINY, serving, write_corpus
from tests.test_hybrid_compare import CHANGED, EDITS

# a document that tries to inject markup: the page must show it as text
HOSTILE = {"notes.md": "# Release notes\n\n## Schedule\n\nThe spring release ships on 12 March. "
           "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"> Nothing else changes.\n"}
QUESTION = "When does the spring release ship?"
CHROMIUM = os.environ.get("OPENBOOK_CHROMIUM") or next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
SCREENSHOT = Path(".openbook") / "ui-test.png"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo over TINY + HOSTILE with a RAFT adapter but no fine-tuned one, and a stand-in report."""
    from finetune.lora import add_lora, load_base
    from finetune.train import TrainConfig
    from hybrid.demo import Demo, UiConfig

    root = tmp_path_factory.mktemp("ui")
    docs = write_corpus(root / "docs", {**TINY, **HOSTILE})
    (docs / "changes").mkdir()  # the freshness demo's change set: compare's one edit and its question
    (docs / "changes" / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in EDITS))
    (docs / "changes" / "golden.jsonl").write_text("\n".join(json.dumps(q) for q in CHANGED))
    # a fresh LoRA (B = 0) is a real adapter for the packaged model: what the UI loads does not depend on
    # training, and 2 training steps would add ~20 s to every test run
    model, _ = load_base("smollm2-135m", "cpu")
    add_lora(model, TrainConfig()).save_pretrained(str(root / "raft" / "adapter"))
    (root / "report").mkdir()
    (root / "report" / "report.html").write_text("<h1>openbook comparison — stand-in</h1>")
    return Demo(UiConfig(model="smollm2-135m",
                         docs=str(docs), index_dir=str(root / "index"), finetuned=str(root / "no-finetune"),
                         raft=str(root / "raft"), report=str(root / "report"), max_new_tokens=16))


def test_api_streams_answers_and_says_what_is_missing(demo):
    from fastapi.testclient import TestClient

    from hybrid.ui import create_app

    client = TestClient(create_app(demo), base_url="http://127.0.0.1")
    missing = {s["name"]: s["missing"] for s in client.get("/api/status").json()["systems"]}
    assert missing["base"] == missing["rag"] == missing["hybrid"] == ""
    assert "run `make finetune DOCS=" in missing["finetuned"] and "make finetune" in missing["finetuned+rag"]
    assert client.get("/api/ask", params={"q": QUESTION, "systems": "finetuned"}).status_code == 400

    with client.stream("GET", "/api/ask", params={"q": QUESTION, "systems": "base"}) as r:
        events = [(e.split("\n")[0][7:], json.loads(e.split("\n")[1][6:])) for e in r.read().decode().split("\n\n")
                  if e.startswith("event: ")]
    names = [n for n, _ in events]
    assert names[0] == "start" and names[-2:] == ["done", "end"] and "token" in names  # streamed, then the answer
    done = events[-2][1]
    assert "".join(d["text"] for n, d in events if n == "token").strip() == done["text"]
    assert done["new_tokens"] > 0 and done["prompt_tokens"] > 0 and done["timings"]["generate"] > 0

    lists = client.get("/api/inspect", params={"q": QUESTION}).json()["lists"]
    assert set(lists) == {"bm25", "dense", "fused", "rerank", "final"}
    assert lists["bm25"][0]["doc"] == "notes.md"  # "spring release ship" are its words only
    assert client.get("/report").text.startswith("<h1>openbook comparison")

    fresh = client.post("/api/freshness").json()  # the edit applied to a copy: the live index is untouched
    assert fresh["reembedded_chunks"] > 0 and fresh["retrieved_new"] == 1.0
    assert fresh["items"][0]["new"] == "60 days" and set(fresh["items"][0]) >= {"answer", "fresh", "stale"}
    (Path(demo.cfg.docs) / "faq.md").write_text("# FAQ\n\nSupport answers within one working day.\n")
    corpus = client.post("/api/reindex").json()
    assert corpus["documents"] == 7 and corpus["last_update"]["added"] == 1 and corpus["modified_since"] == 0
    # a page on another site that rebinds its DNS name to 127.0.0.1 still sends its own Host header
    assert TestClient(create_app(demo), base_url="http://evil.example").get("/api/status").status_code == 400


def test_cli_refuses_remote_host_and_busy_port(capsys):
    from hybrid.cli import main

    assert main(["ui", "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["ui", "--port", str(s.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err


@pytest.fixture
def server(demo):
    from hybrid.ui import create_app

    with serving(create_app(demo)) as url:
        yield url


@pytest.fixture(scope="module")
def chromium() -> str:
    """The system's Chromium, or a skip that says how to get one (Playwright never downloads a browser here)."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (`make setup` installs the "
                        "test extra)")
    if not CHROMIUM:
        pytest.skip("no Chromium: `make setup` installs Debian's chromium package (apt-get, as root), or set "
                    "OPENBOOK_CHROMIUM=/path/to/chromium")
    return CHROMIUM


def test_page_in_headless_chromium(chromium, server, demo):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        page.fill("#q", QUESTION)
        page.click("#ask-btn")
        cols = page.locator(".col")
        expect(cols).to_have_count(5)
        expect(page.locator(".col[data-state=done]")).to_have_count(3, timeout=120_000)  # base, RAG, hybrid
        for system in ("base", "rag", "hybrid"):
            col = page.locator(f".col[data-system='{system}']")
            assert col.locator(".answer").inner_text().strip() or col.locator(".idk").count(), system
            expect(col.locator(".meta")).to_contain_text("generated tokens")
        for system in ("finetuned", "finetuned+rag"):
            expect(page.locator(f".col[data-system='{system}']")).to_contain_text("run make finetune DOCS=")

        # the RAG column's source from notes.md opens to its passage, <script> and all, as plain text
        rag = page.locator(".col[data-system=rag]")
        source = rag.locator("details", has=page.locator("summary", has_text="notes.md › Release notes › Schedule"))
        source.locator("summary").click()
        passage = source.locator(".passage")
        expect(passage).to_be_visible()
        expect(passage).to_contain_text("notes.md › Release notes › Schedule")
        expect(passage.locator("pre")).to_contain_text("<script>window.pwned = 1</script><img src=x")
        assert page.locator("img").count() == 0 and page.locator("script").count() == 1  # only the page's own
        assert page.evaluate("() => window.pwned") is None and not errors, errors

        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        # an abstention is shown as a refusal with its reason: a threshold no passage reaches (no generation)
        for pipe in demo.pipes.values():
            pipe.cfg.abstain = "rerank<2"  # probabilities never reach 2
        try:
            page.click("#ask-btn")
            expect(page.locator(".col[data-state=done]")).to_have_count(3, timeout=60_000)
        finally:
            for pipe in demo.pipes.values():
                pipe.cfg.abstain = "calibrated"
        expect(rag.locator(".idk")).to_have_text("I don't know")
        expect(rag).to_contain_text("below the threshold")
        # the second ask is a follow-up of the first; the same question again is searched for as asked
        expect(page.locator("#convo")).to_contain_text("Follow-up to 1 earlier question · searched for the question "
                                                       "as asked (asked before)")

        page.click("#inspect-btn")  # why a passage won: every stage's list, the generator's passages marked
        expect(page.locator("[data-list]")).to_have_count(5, timeout=60_000)
        expect(page.locator("[data-list=bm25] tr.chosen").first).to_contain_text("notes.md")
        expect(page.locator("#searched")).to_contain_text(f"searched for: {QUESTION} (as asked: asked before)")

        page.click("nav button[data-tab=report]")
        expect(page.frame_locator("#report iframe").locator("h1")).to_have_text("openbook comparison — stand-in")
        browser.close()

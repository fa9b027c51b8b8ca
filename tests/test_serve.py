"""`openbook serve` through the official OpenAI client, against the server running for real on a local port:
the models it lists, a cited answer whole and streamed (the same text either way), an abstention, requests at
once queueing, and the errors a client sees (unknown model, bad request, cross-site POST)."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from tests.conftest import serving, write_corpus

openai = pytest.importorskip("openai", reason="the test extra installs the openai client (`make setup`)")
OFFICE = "When does the Ghent office open?"
OFF_TOPIC = "Who won the 1998 football world cup?"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The tiny corpus on the packaged 135M model, no adapters trained: base and RAG can run."""
    from hybrid.demo import Demo
    from hybrid.serve import ServeConfig

    root = tmp_path_factory.mktemp("serve")
    docs = write_corpus(root / "docs")
    demo = Demo(ServeConfig(model="smollm2-135m",
                            docs=str(docs), index_dir=str(root / "index"), finetuned=str(root / "none"),
                            raft=str(root / "none"), max_new_tokens=24))
    # no golden file, so no calibrated rule: the re-ranker threshold test_cli's abstention test uses (the
    # off-topic question's best passage scores ~0.1, the answerable ones ~0.7-0.9)
    demo.rag.cfg.abstain = "rerank<0.2"
    return demo


@pytest.fixture(scope="module")
def url(demo):
    from hybrid.serve import create_app

    with serving(create_app(demo)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_models_are_the_systems_that_can_run(client):
    assert [m.id for m in client.models.list()] == ["base", "rag"]  # no adapter: no finetuned, no hybrid
    rag = client.models.retrieve("rag")
    assert rag.owned_by == "openbook" and rag.openbook["retrieval"] is True and rag.openbook["adapter"] is None
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("hybrid")


def test_answer_cites_its_source(client):
    r = client.chat.completions.create(model="rag", messages=ask(OFFICE))
    text, ob = r.choices[0].message.content, r.openbook
    assert r.object == "chat.completion" and r.model == "rag" and r.choices[0].finish_reason in ("stop", "length")
    assert "08:30" in text and not ob["abstained"]
    cited = [s for s in ob["sources"] if s["cited"]]
    assert cited and cited[0]["doc"] == "office.html" and "08:30" in cited[0]["text"]
    assert f"[{cited[0]['n']}]" in text  # the source is in the text too
    assert ob["query"] == OFFICE and ob["rewritten"] is False  # a first turn is not rewritten
    assert r.usage.prompt_tokens > 100 and 0 < r.usage.completion_tokens <= 24


def test_stream_assembles_to_the_same_answer(client):
    whole = client.chat.completions.create(model="rag", messages=ask(OFFICE))
    chunks = list(client.chat.completions.create(model="rag", messages=ask(OFFICE), stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3  # streamed token by token, not in one piece
    assert "".join(pieces) == whole.choices[0].message.content  # greedy: the same text either way
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.openbook["sources"] == whole.openbook["sources"]
    assert not chunks[-1].choices and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_off_topic_question_abstains(client):
    r = client.chat.completions.create(model="rag", messages=ask(OFF_TOPIC))
    assert r.choices[0].message.content == "I don't know."
    assert r.openbook["abstained"] and r.openbook["reason"] == "low-confidence" and r.openbook["cited"] == []
    assert all(s["rerank"] < 0.2 for s in r.openbook["sources"])  # retrieved, refused before generating


def test_requests_at_once_queue(client):
    """Four clients at once, streaming and not: every one gets the answer one client alone gets."""
    alone = client.chat.completions.create(model="rag", messages=ask(OFFICE)).choices[0].message.content
    got, errors = [], []

    def one(stream: bool) -> None:
        try:
            r = client.chat.completions.create(model="rag", messages=ask(OFFICE), stream=stream)
            got.append("".join(c.choices[0].delta.content or "" for c in r if c.choices) if stream
                       else r.choices[0].message.content)
        except Exception as e:  # collected: an exception in a thread would not fail the test
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and got == [alone] * 4


def test_errors_are_openai_shaped(client, url):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=ask(OFFICE))
    assert e.value.code == "model_not_found" and "this server has: base, rag" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="hybrid", messages=ask(OFFICE))
    assert "make hybrid" in e.value.message  # what would make it available
    for messages in ([], [{"role": "assistant", "content": "Hello"}], ask("   "), [{"role": "wizard", "content": "x"}]):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="rag", messages=messages)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="rag", messages=ask(OFFICE), n=2)
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is not JSON"
    # a page on another site may POST here (no CORS pre-flight for a form); it is refused before any work
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "rag", "messages": ask(OFFICE)},
                   headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.json()["error"]["message"]
    # and a DNS-rebinding page still sends its own Host name
    assert httpx.get(f"{url}/v1/models", headers={"Host": "evil.example"}).status_code == 400


def test_follow_up_is_made_standalone_from_the_messages(client):
    follow = "And how many meeting rooms does it have?"
    r = client.chat.completions.create(model="rag", messages=[
        {"role": "system", "content": "Answer in French."},  # ignored: the grounded prompt is fixed
        {"role": "user", "content": OFFICE}, {"role": "assistant", "content": "It opens at 08:30 [1]."},
        {"role": "user", "content": [{"type": "text", "text": follow}]}])  # content as parts, as clients send it
    ob = r.openbook
    assert ob["rewrite_reason"] not in ("first turn", "asked before")  # the reader was asked to rewrite it
    assert ob["rewritten"] == (ob["query"] != follow) and ob["query"].strip()
    alone = client.chat.completions.create(model="rag", messages=ask(follow))
    assert alone.openbook["rewrite_reason"] == "first turn"


def test_cli_refuses_remote_host_and_busy_port(capsys):
    from hybrid.console import main as openbook

    assert openbook(["serve", "--host", "0.0.0.0"]) == 2  # the alias reaches `hybrid serve`'s own checks
    assert "--allow-remote" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert openbook(["serve", "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen" in err


def test_stream_is_server_sent_events(url):
    """The wire format itself, for clients other than openai's: data lines only, ending in [DONE]."""
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                      json={"model": "base", "messages": ask(OFFICE), "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events) and events[-1] == "data: [DONE]"
    body = [json.loads(e[6:]) for e in events[:-1]]
    assert {b["object"] for b in body} == {"chat.completion.chunk"} and len({b["id"] for b in body}) == 1
    assert body[-1]["openbook"]["sources"] == [] and body[-1]["choices"][0]["finish_reason"] in ("stop", "length")

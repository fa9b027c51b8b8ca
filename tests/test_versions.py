"""Older versions of a passage (rag/versions.py): on a real index, a superseded document's passage gives its place
to its newer twin, and only to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag.ingest import load_folder
from rag.pipeline import RagConfig, RagPipeline
from rag.versions import status
from tests.conftest import write_corpus

RULES = ("## Return shipping\n\nIf you use the prepaid label from your account, EUR {fee} is deducted from your "
         "refund for any destination we ship to. Customers outside the European Union pay their own courier and "
         "customs costs, and the parcel must carry the return number on its label.\n")
OLD = ("# Returns policy, version 1\n\n> **SUPERSEDED - DO NOT USE.** Replaced by version 2 on 2025-03-01.\n\n"
       + RULES.format(fee="7.50")
       + "\n## Gift cards\n\nGift cards bought before 2025 could be exchanged for store credit at the Venlo desk.\n")
NEW = ("# Returns policy, version 2\n\n**Status: CURRENT.** This version replaces the superseded version 1.\n\n"
       + RULES.format(fee="5.95"))
DATED = "---\ndate: {day}\n---\n# Travel rates\n\nThe mileage allowance for private cars is EUR {rate} per km, " \
        "paid monthly with the salary, for business trips that a manager approved beforehand in the travel tool.\n"
FILES = {
    "policies/returns-v1.md": OLD,
    "policies/returns-v2.md": NEW,
    "travel/rates-2024.md": DATED.format(day="2024-01-01", rate="0.43"),
    "travel/rates-2025.md": DATED.format(day="2025-01-01", rate="0.45"),
    "travel/rates-copy.md": DATED.format(day="2025-01-01", rate="0.46"),  # same date as rates-2025: no order
    "shipping.md": "# Shipping\n\nOrders above EUR 60 ship free within the European Union.\n",
}
FEE = "How much is deducted from the refund for the prepaid return label?"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("versions")
    docs = write_corpus(root / "docs", FILES)
    RagPipeline(RagConfig(docs=str(docs), index_dir=str(root / "index"))).update_index(progress=False)
    return docs, root / "index"


def ranked(built, question: str, **over):
    docs, index_dir = built
    trace: dict = {}
    pipe = RagPipeline(RagConfig(docs=str(docs), index_dir=str(index_dir), **over))
    pipe.update_index(progress=False)  # loads the built index: nothing changed
    return pipe.ranked(question, mode="hybrid", trace=trace).hits, trace


@pytest.mark.parametrize("front, text, expected", [
    ({}, "# Policy v1\n\n> **SUPERSEDED - DO NOT USE FOR NEW ORDERS.** See version 2.", "superseded"),
    ({}, "# Handbook 2019\nObsolete. Kept for reference only.", "superseded"),
    ({}, "Superseded by the 2024 handbook\n\n# Handbook", "superseded"),
    ({}, "# Travel policy (archived)\n\nText.", "superseded"),
    ({"status": "Deprecated"}, "# API guide", "superseded"),
    ({"superseded_by": "guide-v2.md"}, "# Guide", "superseded"),
    ({"status": "current"}, "# Guide", ""),
    ({}, "# Obsolete features\n\nThe TW-100 is no longer sold.", ""),  # a title about old things is no status
    ({}, "# Returns policy, version 2\n\nThis version replaces the superseded version 1.", ""),
    ({}, "# API\n\nDeprecated: the /v1 endpoints (see the table below).", ""),  # about a feature, not the page
    ({}, "# Guide\n\n" + "Setup step.\n" * 10 + "SUPERSEDED - DO NOT USE.", ""),  # not at the top
])
def test_a_document_is_superseded_only_by_its_own_status(front, text, expected):
    assert status(front, text) == expected


def test_only_the_document_that_says_so_is_marked_when_indexed(built):
    docs, _ = built
    marked = {d.id for d in load_folder(docs, progress=False) if d.meta.get("status")}
    assert marked == {"policies/returns-v1.md"}


def test_a_superseded_passage_gives_its_place_to_its_newer_twin(built):
    everything, _ = ranked(built, FEE, versions="all", k=5)
    assert {"policies/returns-v1.md", "policies/returns-v2.md"} <= {h.doc_id for h in everything}
    hits, trace = ranked(built, FEE, k=5)
    texts = [h.text for h in hits]
    assert any("EUR 5.95" in t for t in texts) and not any("EUR 7.50" in t for t in texts)
    assert len({h.text for h in hits}) == len(hits)  # the twin is not shown twice
    replaced = dict(trace["replaced"])
    assert all(old.startswith("policies/returns-v1.md") and new.startswith("policies/returns-v2.md")
               for old, new in replaced.items())


def test_what_only_the_old_version_says_is_still_found_and_shown_as_superseded(built, capsys):
    from rag.cli import _print_answer
    from rag.ranking import Answer

    question = "Where could gift cards be exchanged for store credit?"
    hits, _ = ranked(built, question, k=3)
    assert hits[0].doc_id == "policies/returns-v1.md" and "Venlo" in hits[0].text
    _print_answer(Answer(question, "At the Venlo desk [1].", False, "", hits, hits[:1], True, None), streamed=False)
    assert "[1] policies/returns-v1.md › Returns policy, version 1 › Gift cards  (superseded · date " \
        in capsys.readouterr().out


def test_where_status_leaves_out_the_documents_marked_superseded_in_their_text(built):
    """`--where status!=superseded` drops the version whose status line (no front matter) says it is replaced:
    what only the old version says is then not found."""
    question = "Where could gift cards be exchanged for store credit?"
    hits, _ = ranked(built, question, k=3, where=["status!=superseded"])
    assert hits and "policies/returns-v1.md" not in {h.doc_id for h in hits}
    hits, _ = ranked(built, question, k=3, where=["status=superseded"])
    assert {h.doc_id for h in hits} == {"policies/returns-v1.md"}


def test_the_later_front_matter_date_wins_and_equal_dates_keep_both(built):
    question = "What mileage allowance per km is paid for a private car?"
    shown = {h.doc_id for h in ranked(built, question, k=5)[0]}
    assert "travel/rates-2024.md" not in shown
    assert {"travel/rates-2025.md", "travel/rates-copy.md"} <= shown
    assert "travel/rates-2024.md" in {h.doc_id for h in ranked(built, question, k=5, versions="all")[0]}


def test_versions_is_checked():
    with pytest.raises(ValueError, match="--versions must be newest or all"):
        RagConfig(versions="latest")

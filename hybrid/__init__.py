"""RAFT-style hybrid (a generator fine-tuned to answer from retrieved passages) and the side-by-side comparison.

``raft`` builds the training rows, ``compare`` runs base / fine-tuned / RAG / fine-tuned + RAG / hybrid on the
same questions, ``report`` renders the table, decision matrix and charts; ``python -m hybrid`` is the CLI.
"""

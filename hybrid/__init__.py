"""RAFT-style hybrid and the side-by-side comparison (planned: issue 5; nothing here yet)."""

"""openbook's base layer: corpus, chunking, index, retrieval, re-ranking, generation and metrics."""

from rag.chunk import Chunk, ChunkConfig, chunk_document
from rag.ingest import Document, IngestError, load_folder
from rag.pipeline import RagConfig, RagPipeline
from rag.ranking import MODES, Answer, Hit

__all__ = ["Answer", "Chunk", "ChunkConfig", "Document", "Hit", "IngestError", "MODES", "RagConfig",
           "RagPipeline", "chunk_document", "load_folder"]

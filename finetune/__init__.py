"""LoRA fine-tuning on the corpus RAG indexes.

Training data (``data``), LoRA training (``train``), closed-book evaluation (``evaluate``); ``python -m finetune``.
"""

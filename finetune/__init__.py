"""LoRA fine-tuning on the same corpus (planned: issue 4; nothing here yet)."""

"""Fine-tuning by distillation (finetune)."""

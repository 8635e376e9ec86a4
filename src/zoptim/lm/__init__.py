"""Fine-tuning language models with forward passes only: models, tasks, prompt losses, the loop."""

from .models import load_model

__all__ = ["load_model"]

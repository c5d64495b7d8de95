"""lorafast-export: compile LoRA/DoRA fine-tuned LLMs into validated deployable artifacts."""

__version__ = "0.1.0"

"""internvl: InternVL multimodal LLMs in plain PyTorch (load, chat, serve, fine-tune, evaluate)."""

__version__ = "0.1.0"

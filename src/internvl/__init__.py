"""internvl: InternVL multimodal LLMs in plain PyTorch (load, chat, serve, fine-tune, evaluate)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `internvl.load` without importing torch at `import internvl` (keeps the CLI's --help fast)
    if name in ("load", "InternVL"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'internvl' has no attribute {name!r}")

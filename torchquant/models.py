"""Known models and model folders, loaded; kept in :mod:`torchquant.tools.models`."""

from torchquant.tools.models import DEFAULT_MODEL, MODELS, default_text, fetch_asset, load_model

__all__ = ["DEFAULT_MODEL", "MODELS", "default_text", "fetch_asset", "load_model"]

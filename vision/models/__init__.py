"""timm-registered backbone families, one file per family.

Each family module registers its variants with ``@register_model`` on import.
A new family is one file here plus one import line below; the shared test
battery (tests/test_models.py) finds it through :func:`list_models`.
"""

import pkgutil

import timm

# Family modules: importing them registers their variants with timm.
# (one line per family, keep alphabetical)
from . import agent_deit, agent_pvt, agent_swin, biformer, dynamicvit, evit, l2vit, litv2, nat, vsa_swin  # noqa: F401

_FAMILIES = tuple(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def list_models(pattern: str = "*") -> list[str]:
    """Names of the models this package registers (not timm's own), sorted."""
    return timm.list_models(pattern, module=list(_FAMILIES)) if _FAMILIES else []


def create_model(name: str, pretrained_file: str | None = None, **kwargs):
    """``timm.create_model`` with this package's registry loaded.

    ``pretrained_file`` loads a local checkpoint through the family's
    ``checkpoint_filter_fn`` (official key names are remapped); nothing is
    downloaded, and only tensors and plain containers are read (``weights_only``).
    Hydra configs target this function rather than ``timm.create_model`` so the
    registry is always imported first.
    """
    if pretrained_file:
        from ..utils.checkpoint import load_checkpoint_file

        load_checkpoint_file(pretrained_file)  # weights_only=True: a file that needs pickled code is refused
        overlay = dict(file=str(pretrained_file))
        if "num_classes" in kwargs:  # keep the checkpoint's head only when sizes agree
            overlay["num_classes"] = kwargs["num_classes"]
        kwargs.setdefault("pretrained_cfg_overlay", overlay)
        return timm.create_model(name, pretrained=True, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


from . import _trace  # noqa: E402,F401  FX leaves for timm's feature_cls="fx" (see _trace.py)

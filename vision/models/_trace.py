"""What FX keeps as single calls when it traces a model (timm's ``feature_cls="fx"``,
``timm.models.create_feature_extractor``, torchvision's ``create_feature_extractor`` with timm's
``get_notrace_modules()`` / ``get_notrace_functions()``).

FX cannot follow Python branches on the input size: every attention module pads, windows or resizes by
shape, and a few model layers resize a position embedding, prune tokens or leave autocast. They are
registered here (one place, so the list is easy to review) as leaves; everything between them, the stage
structure that ``feature_cls="fx"`` taps, is traced. The Triton custom ops sit inside the leaves.
"""

import inspect

from timm.models import register_notrace_function, register_notrace_module

from .. import attention
from . import _vit, agent_pvt, dynamicvit, evit, litv2, vitaev2_vsa

for _name in attention.__all__:
    _obj = getattr(attention, _name)
    if inspect.isclass(_obj):
        register_notrace_module(_obj)

register_notrace_module(_vit.PatchEmbed)  # pads to a multiple of the patch
register_notrace_function(_vit.resize_pos_embed)  # skips the resample at the trained grid
register_notrace_module(agent_pvt.PatchEmbed)  # resizes its position embedding to the grid
register_notrace_module(litv2.DeformableTokenMerging)  # autocast off around torchvision's deform_conv2d
register_notrace_module(evit.Block)  # keeps ceil(rate * tokens) tokens
register_notrace_function(dynamicvit.prune_by_score)  # keeps int(ratio * patches) tokens
register_notrace_module(vitaev2_vsa.PyramidReduction)  # pads each dilated conv by the input size

"""The networks: the paper's and the zoo's families, feature taps, convolutions, the model
registry, and the PyTorch key layouts. No training, no files.

One module per family (:mod:`~l2t_jax.models.cifar_resnet`, :mod:`~l2t_jax.models.vgg`,
:mod:`~l2t_jax.models.imagenet_resnet`, :mod:`~l2t_jax.models.wide_resnet`,
:mod:`~l2t_jax.models.mobilenet_v2`), each registering its
:class:`~l2t_jax.models.registry.ModelFamily`; the layers they share in
:mod:`~l2t_jax.models.layers`; taps by name in :mod:`~l2t_jax.models.taps`. Importing this
package applies the XLA flags the package needs before any computation
(:mod:`~l2t_jax.models.xla_workarounds`, through :mod:`~l2t_jax.models.convolution`).
"""
from l2t_jax.models.registry import (ModelFamily, TINY_SUFFIX, display_name, family_of,
                                     get_model, is_import_path, is_model_name, model_names,
                                     register_family, tiny_overrides)
from l2t_jax.models.taps import Tap, TappedNetwork, available_taps, combine, tapped

# The families that ship with the package: importing each registers it (in this order).
from l2t_jax.models import cifar_resnet  # noqa: F401,E402
from l2t_jax.models import vgg  # noqa: F401,E402
from l2t_jax.models import imagenet_resnet  # noqa: F401,E402
from l2t_jax.models import wide_resnet  # noqa: F401,E402
from l2t_jax.models import mobilenet_v2  # noqa: F401,E402

__all__ = ["ModelFamily", "TINY_SUFFIX", "Tap", "TappedNetwork", "available_taps", "combine",
           "display_name", "family_of", "get_model", "is_import_path", "is_model_name",
           "model_names", "register_family", "tapped", "tiny_overrides"]

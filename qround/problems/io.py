"""Layer statistics files: one layer's weights and second moments in a ``.npz``.

The format users hand to the CLI and share with QUBO researchers (numpy only, no pickles).
Keys (``out`` output channels, ``n`` inputs per channel):

============== ======================= =====================================================
key            shape / dtype           meaning
============== ======================= =====================================================
weight         (out, n) float          float weights (a conv's reshaped to (out, c_in*kh*kw))
hessian        (n, n) float64          ``H = E[x x^T]`` (or ``H_hat`` for asymmetric);
                                       (out, n, n) per channel (Fisher) is accepted too
scale          (out,) or (out, groups) optional grid scales, used as given when present
zero_point     like scale              optional zero points (required with an asymmetric scale)
bias           (out,)                  optional layer bias (carried along, not rounded)
cross          (n, n)                  optional ``C = E[x_hat x^T]`` (asymmetric reconstruction)
float_hessian  (n, n)                  optional ``E[x x^T]`` of the float model (with cross)
bits           int                     grid bit width
symmetric      bool                    signed symmetric grid (zero point 0) or unsigned
group_size     int                     inputs per scale group, -1 for one scale per channel
name           str                     layer name
format_version int                     currently 1
============== ======================= =====================================================

Writes are atomic: a temporary file in the target directory is renamed over the target with
``os.replace``, so a failed write never leaves a partial file or damages an existing one.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, fields

import numpy as np

from ..files import atomic_write
from .._warn import warn_user
from ..errors import QroundError, as_float_array, check_bits
from ..grid import GridSpec, fit_grid
from .rounding import RoundingProblem

FORMAT_VERSION = 1
_ARRAYS = ("weight", "hessian", "scale", "zero_point", "bias", "cross", "float_hessian")
_REQUIRED = ("weight", "hessian", "bits", "symmetric", "group_size", "name", "format_version")


@dataclass(frozen=True, eq=False)
class LayerStats:
    """The contents of a layer statistics file (see the module docstring for the keys)."""

    weight: np.ndarray
    hessian: np.ndarray
    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    bias: np.ndarray | None = None
    cross: np.ndarray | None = None
    float_hessian: np.ndarray | None = None
    name: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        check_bits(self.bits)
        if not isinstance(self.symmetric, (bool, np.bool_)):
            raise QroundError(f"symmetric must be True or False, got {self.symmetric!r}")
        w = as_float_array(self.weight, "weight", ndim=2)
        out, n = w.shape
        h = as_float_array(self.hessian, "hessian", ndim=(2, 3))
        if h.shape[-2:] != (n, n) or (h.ndim == 3 and h.shape[0] != out):
            raise QroundError(f"hessian shape {h.shape} does not match weight shape {w.shape}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, (int, np.integer))
                               or gs < 1 or (gs < n and n % gs)):
            raise QroundError(f"group_size={gs!r} must be a positive integer dividing {n}")
        arrays = {"weight": w, "hessian": h}
        for key, shape in (("cross", (n, n)), ("float_hessian", (n, n)), ("bias", (out,))):
            value = getattr(self, key)
            if value is not None:
                arrays[key] = as_float_array(value, key)
                if arrays[key].shape != shape:
                    raise QroundError(f"{key} must have shape {shape}, got {arrays[key].shape}")
        if self.float_hessian is not None and self.cross is None:
            raise QroundError("float_hessian is only used together with cross")
        if self.zero_point is not None and self.scale is None:
            raise QroundError("zero_point is given without scale")
        if self.scale is not None:
            # fit_grid validates shapes, positivity and the zero-point range
            grid = fit_grid(w, self._spec(), scale=self.scale, zero_point=self.zero_point)
            arrays["scale"], arrays["zero_point"] = grid.scale, grid.zero_point
        for key, value in arrays.items():
            value = value.copy()
            value.flags.writeable = False
            object.__setattr__(self, key, value)
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "symmetric", bool(self.symmetric))
        object.__setattr__(self, "name", str(self.name))

    def _spec(self, bits: int | None = None, scale_method: str = "mse") -> GridSpec:
        return GridSpec(bits=self.bits if bits is None else bits, symmetric=self.symmetric,
                        group_size=self.group_size, scale_method=scale_method)

    def problem(self, bits: int | None = None, scale_method: str | None = None) -> RoundingProblem:
        """The rounding problem of the layer.

        With a stored ``scale`` the grid is used as given (a ``bits`` different from the file's
        is an error: the scales were fitted for it, and so is a ``scale_method``: nothing is
        searched); otherwise a grid is fitted with ``scale_method`` (default ``mse``) at
        ``bits`` (default: the file's).
        """
        if self.scale is not None:
            if bits is not None and bits != self.bits:
                raise QroundError(f"bits={bits} differs from the file's bits={self.bits}, for "
                                  "which its scales were fitted; drop bits= or the stored scale")
            if scale_method is not None:
                raise QroundError(f"scale_method={scale_method!r} is not used: the file stores "
                                  "its scales (no search runs); drop it, or drop the stored scale")
            grid = fit_grid(self.weight, self._spec(), scale=self.scale,
                            zero_point=self.zero_point)
        else:  # fitted by from_weight, on the problem's own cost (the target's, with cross)
            grid = self._spec(bits, scale_method or "mse")
        return RoundingProblem.from_weight(self.weight, self.hessian, grid, cross=self.cross,
                                           float_hessian=self.float_hessian, name=self.name)

    @classmethod
    def from_module(cls, module, hessian, spec: GridSpec = GridSpec(), *, name: str = "",
                    cross=None, float_hessian=None) -> "LayerStats":
        """Statistics of a Linear or ungrouped Conv2d/Conv1d with its fitted grid (scale, zero
        point) and bias.  hessian: (n, n) as from ``qround.calibrate.capture_hessians``."""
        from .layers import layer_groups, layer_weight

        if layer_groups(module) != 1:
            raise QroundError(f"layer {name or type(module).__name__} has {module.groups} groups: "
                              "the statistics file holds one group; save one file per group")
        w = layer_weight(module)
        target = None
        h = as_float_array(hessian, "hessian", ndim=(2, 3))
        if cross is not None:
            if h.ndim != 2:
                raise QroundError("asymmetric reconstruction (cross=) needs a shared (n, n) "
                                  "hessian")
            c = as_float_array(cross, "cross", ndim=2)
            if c.shape != (w.shape[1], w.shape[1]):
                raise QroundError(f"cross must have shape {(w.shape[1], w.shape[1])}, got "
                                  f"{c.shape}")
            target = w @ c.T
        grid = fit_grid(w, spec, hessian=h, target=target)
        bias = None if module.bias is None else module.bias.detach().cpu().double().numpy()
        return cls(weight=w, hessian=hessian, bits=spec.bits, symmetric=spec.symmetric,
                   group_size=grid.group_size, scale=grid.scale, zero_point=grid.zero_point,
                   bias=bias, cross=cross, float_hessian=float_hessian, name=name)

    def save(self, path: str | os.PathLike) -> None:
        """Write the file atomically (see :func:`save_layer_stats`)."""
        payload = {key: getattr(self, key) for key in _ARRAYS if getattr(self, key) is not None}
        payload.update(bits=np.int64(self.bits), symmetric=np.bool_(self.symmetric),
                       group_size=np.int64(-1 if self.group_size is None else self.group_size),
                       name=np.str_(self.name), format_version=np.int64(FORMAT_VERSION))
        _atomic_savez(path, payload)


def _atomic_savez(path: str | os.PathLike, payload: dict) -> None:
    with atomic_write(path, what="layer statistics file", make_folder=True) as f:
        np.savez(f, **payload)


def save_layer_stats(path: str | os.PathLike, weight, hessian, *, bits: int = 4,
                     symmetric: bool = True, group_size: int | None = None, scale=None,
                     zero_point=None, bias=None, cross=None, float_hessian=None,
                     name: str = "") -> LayerStats:
    """Validate and write a layer statistics file atomically; returns what was written.

    weight (out, n); hessian (n, n); scale/zero_point (out,) or (out, groups); bias (out,);
    cross/float_hessian (n, n).
    """
    stats = LayerStats(weight=weight, hessian=hessian, bits=bits, symmetric=symmetric,
                       group_size=group_size, scale=scale, zero_point=zero_point, bias=bias,
                       cross=cross, float_hessian=float_hessian, name=name)
    stats.save(path)
    return stats


def save_layer_stats_from_module(path: str | os.PathLike, module, hessian,
                                 spec: GridSpec = GridSpec(), *, name: str = "") -> LayerStats:
    """:meth:`LayerStats.from_module` then :meth:`LayerStats.save`; returns the stats."""
    stats = LayerStats.from_module(module, hessian, spec, name=name)
    stats.save(path)
    return stats


def load_layer_stats(path: str | os.PathLike) -> LayerStats:
    """Read and validate a layer statistics file; QroundError naming the file or missing key."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise QroundError(f"layer statistics file {path!r} is a folder")
    if not os.path.isfile(path):
        raise QroundError(f"layer statistics file {path!r} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise QroundError(f"layer statistics file {path!r} is a single array (.npy), not an "
                              "archive of named arrays (.npz, see qround.problems.io)")
        with data:
            contents = {key: data[key] for key in data.files}
    except QroundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        why = "neither an .npz archive nor a .npy array" if "pickled" in str(exc) else str(exc)
        raise QroundError(f"layer statistics file {path!r} is not a readable .npz: {why}") \
            from exc
    missing = [key for key in _REQUIRED if key not in contents]
    if missing:
        raise QroundError(f"layer statistics file {path!r} lacks key(s) {missing}")
    def scalar(key, kind):
        """A 0-d entry ``key`` of the file as ``kind`` (int, bool or str), or a QroundError."""
        value = contents[key]
        if not isinstance(value, np.ndarray):  # a member that is not an .npy array
            raise QroundError(f"layer statistics file {path!r}: {key!r} is not a numpy array "
                              "(the archive was not written by numpy.savez)")
        ok = value.ndim == 0 and {
            int: lambda v: np.issubdtype(v.dtype, np.integer) and v.dtype != bool,
            bool: lambda v: v.dtype == bool,
            str: lambda v: v.dtype.kind == "U"}[kind](value)
        if not ok:
            raise QroundError(f"layer statistics file {path!r}: {key!r} must be a single "
                              f"{kind.__name__}, got dtype {value.dtype} and shape {value.shape}")
        return kind(value)

    version = scalar("format_version", int)
    if version > FORMAT_VERSION:
        raise QroundError(f"{path!r} has format_version {version}; this qround reads up to "
                          f"{FORMAT_VERSION}")
    if version < 1:   # versions count from 1: a damaged or hand-made file
        raise QroundError(f"{path!r} has format_version {version}; versions start at 1 (the "
                          "file is damaged or was not written by qround)")
    group_size = scalar("group_size", int)
    known = {f.name for f in fields(LayerStats)}
    unknown = sorted(set(contents) - known)
    if unknown:   # a misspelt optional key (scales=) would be dropped without a word
        warn_user(f"layer statistics file {path!r}: ignoring key(s) {unknown}, which qround "
                  f"does not read; it reads {sorted(known)}")
    kwargs = {key: value for key, value in contents.items() if key in known}
    kwargs.update(bits=scalar("bits", int), symmetric=scalar("symmetric", bool),
                  group_size=None if group_size == -1 else group_size,
                  name=scalar("name", str), format_version=version)
    try:
        return LayerStats(**kwargs)
    except QroundError as exc:
        raise QroundError(f"layer statistics file {path!r}: {exc}") from exc

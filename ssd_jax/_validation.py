"""Input checks of the JAX entry points, in two parts.

Shapes and dtypes are known while tracing, so `Shapes` checks them on every call, under
jit too: a wrong shape is a ValueError naming the argument, never a silent broadcast or a raw
XLA message. Values are unknown inside jit, so the reference's value checks
(`reference.validation`) run only when every argument is concrete (`is_concrete`): callers
validate at the edge, then jit.
"""
import jax
import jax.numpy as jnp
import numpy as np

# What each kind of argument may hold. Integer-valued floats pass as labels and 0/1 integers
# as masks, as in the reference (their values are checked when concrete); they are cast.
KINDS = {
    "real": lambda dtype: jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating),
    "int": lambda dtype: jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating),
    "bool": lambda dtype: dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer),
}
KIND_NAMES = {"real": "real numbers", "int": "integer labels", "bool": "booleans"}


def is_concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(arrays))


class Shapes:
    """Checks the shapes of one call's arguments against named dimensions, binding each name
    ("B", "P", ...) to the size it first has, so that every later use must agree:

        shapes = Shapes()
        loc = shapes.check("loc", loc, "B P 4")
        labels = shapes.check("labels", labels, "B P", kind="int")

    A leading "..." matches any number of dimensions (all uses must agree on them too).
    """

    def __init__(self):
        self.sizes = {}  # name -> (size, the argument that set it)

    def check(self, name: str, x, spec: str, kind: str = "real") -> jax.Array:
        """`x` as a JAX array after checking it (ValueError naming `name` otherwise)."""
        x = x if isinstance(x, jax.Array) else jnp.asarray(_as_array(x, name))
        dims = spec.split()
        shape = tuple(x.shape)
        if dims[:1] == ["..."]:
            dims = dims[1:]
            if len(shape) < len(dims):
                raise ValueError(f"{name} must have shape [..., {', '.join(dims)}], got {shape}")
            self._bind("...", shape[:len(shape) - len(dims)], name, spec, shape)
            shape = shape[len(shape) - len(dims):]
        if len(shape) != len(dims):
            raise ValueError(f"{name} must have shape [{', '.join(dims)}], got {x.shape}")
        for dim, size in zip(dims, shape):
            if dim.isdigit():
                if size != int(dim):
                    raise ValueError(f"{name} must have shape [{', '.join(dims)}], got {x.shape}")
            else:
                self._bind(dim, size, name, spec, x.shape)
        if not KINDS[kind](x.dtype):
            raise ValueError(f"{name} must hold {KIND_NAMES[kind]}, got dtype {x.dtype}")
        return x

    def _bind(self, dim, size, name, spec, shape):
        if dim not in self.sizes:
            self.sizes[dim] = (size, name)
            return
        bound, source = self.sizes[dim]
        if bound != size:
            what = "leading dimensions" if dim == "..." else dim
            raise ValueError(f"{name} has shape {shape} but must be [{', '.join(spec.split())}] "
                             f"with {what} = {bound} as in {source}")

    def size(self, dim: str) -> int:
        return self.sizes[dim][0]


def check_scalar(name: str, x) -> None:
    """A threshold or weight must be a scalar (a traced one too)."""
    if jnp.ndim(x) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(x)}")


def check_not_empty(name: str, size: int, what: str) -> None:
    if size == 0:
        raise ValueError(f"{name} must hold at least one {what}, got none")


def _as_array(x, name: str) -> np.ndarray:
    """A NumPy array of a list or array-like, ValueError naming `name` if it is not numeric."""
    try:
        array = np.asarray(x)
    except ValueError as error:  # ragged lists
        raise ValueError(f"{name} must be a rectangular array, got {type(x).__name__}: "
                         f"{error}") from None
    if array.dtype == object or array.dtype.kind in "USV":
        raise ValueError(f"{name} must be a numeric array, got {type(x).__name__} of dtype "
                         f"{array.dtype}")
    return array

"""A function's private copy for torch.compile.

Dynamo keeps a function's compiled graphs on its code object, at most `recompile_limit` (8) of them; past that it
runs the function uncompiled, silently. A copy with a code object of its own has a cache of its own: one per
variant that is meant to compile separately never meets the limit. (The inductor cache still serves the copies.)
"""
import types


def own_code(fn):
    """fn with a code object of its own (same globals, defaults and closure)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)

"""Methods by name: the registry that params' ``method.name`` selects from."""

from lifelong_hashing.engine.methods.base import Method, MethodError, StageResult
from lifelong_hashing.engine.methods.ccmh_gam import CCMHGAM
from lifelong_hashing.engine.methods.dlch import DLCH
from lifelong_hashing.engine.methods.orthohash import Finetune, Joint, LifelongOrthoHash

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Joint, Finetune, DLCH, CCMHGAM, LifelongOrthoHash)
}


def create_method(name: str, *args, **kwargs) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](*args, **kwargs)


__all__ = ["METHODS", "Method", "MethodError", "StageResult", "create_method"]

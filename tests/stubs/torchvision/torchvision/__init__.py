"""An inert stand-in for torchvision (hicache-ha's CPU tests): every name is a placeholder that accepts
any call. SGLang imports torchvision.transforms at module level; its storage code never uses it."""

__version__ = "0.28.0+hicache.ha.stub"


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


class Stub(metaclass=_StubMeta):
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return Stub()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Stub()


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Stub

"""The shipped methods, registered in the order ``cxr-explain methods`` lists them."""
from . import lrp, rap, transformer, gradient, cam, rsp  # noqa: F401

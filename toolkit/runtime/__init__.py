"""The on-device runtime: bundle loading, sessions, sampling, streaming. Never imports torch.

    from toolkit import runtime
    session = runtime.load("bundles/tiny", target="cpu", precision="fp32")
    print(session.generate("Once upon a time", max_new_tokens=32))

Dependencies: numpy, tokenizers, and onnxruntime or openvino (imported when a session is loaded).
"""

from .backends import BACKENDS, Backend, Loaded, OnnxRuntimeBackend, OpenVINOBackend, get_backend
from .prompt import check_prompt
from .session import Session, load_model_file
from .session import load as _load_dynamic


def load(bundle, target="cpu", precision=None):
    """runtime.Session for a bundle variant; static-shape targets (NPUs) get a runtime.static.StaticSession.
    precision None = the target profile's first (preferred) precision: fp32 on cpu, a16w8 on qnn-htp."""
    from ..targets import get as get_target
    from .static import load_static, wants_static

    if precision is None:
        precision = (get_target(target) if isinstance(target, str) else target).precisions[0]
    if wants_static(target):
        return load_static(bundle, target, precision)
    return _load_dynamic(bundle, target, precision)


__all__ = ["BACKENDS", "Backend", "Loaded", "OnnxRuntimeBackend", "OpenVINOBackend", "Session", "check_prompt",
           "get_backend", "load", "load_model_file"]

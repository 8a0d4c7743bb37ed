"""llama-cpp-python's OpenAI-compatible server on the default GGUF model, for trying the
``openai`` backend locally:

    python scripts/serve_llamacpp.py --port 8080 [--model FILE.gguf] [other llama_cpp.server options]

llama.cpp's AMX kernels trap on machines that advertise AMX without the OS enabling it (some
VMs) and the server has no switch for it, so this launcher turns those extra buffers off.
"""

from __future__ import annotations

import sys

import llama_cpp.llama_cpp as lib

from guardprob.models import default_gguf

_default_params = lib.llama_model_default_params


def _params():
    params = _default_params()
    params.use_extra_bufts = False
    return params


if __name__ == "__main__":
    lib.llama_model_default_params = _params
    from llama_cpp.server.__main__ import main

    args = sys.argv[1:]
    if "--model" not in args:
        args = ["--model", str(default_gguf()), *args]
    sys.argv = ["llama_cpp.server", "--host", "127.0.0.1", *args]
    main()

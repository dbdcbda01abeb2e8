"""``tinkerkit serve``: the Tinker HTTP API over the local engine.

Point the unmodified ``tinker`` SDK at it (``TINKER_BASE_URL=http://127.0.0.1:8000``) and Tinker
scripts train and sample on this machine. Modules, one concern each:

* :mod:`~tinkerkit.serve.app`: HTTP server and routes (:func:`make_server`).
* :mod:`~tinkerkit.serve.state`: sessions, training runs, sampling sessions, request order.
* :mod:`~tinkerkit.serve.futures`: request futures and long-polling retrieval.
* :mod:`~tinkerkit.serve.protobuf`: the SDK's protobuf messages, server side.
* :mod:`~tinkerkit.serve.store`: runs and checkpoints on disk.
* :mod:`~tinkerkit.serve.registry`: served base models (the models file).
* :mod:`~tinkerkit.serve.auth`: API keys and the security model.
"""

from tinkerkit.serve.app import TinkerHTTPServer, make_server

__all__ = ["TinkerHTTPServer", "make_server"]

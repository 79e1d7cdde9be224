"""The three backends behind ``backend=``: one contract, ``forward_backward(problem, spec, ...)``.

``reference`` is the oracle (a direct transcription of SPEC §2 that materialises everything),
``torch`` the chunked, memory-lean PyTorch backend, ``triton`` the launcher of the fused kernels
(``triton_plan`` turns a problem into kernel arguments, ``triton_aot`` compiles every kernel
ahead of time). Backends import the core (``fastrecloss._problem``, ``fastrecloss._spec``) and
``fastrecloss.kernels``; never the public modules above them, ``recsys``, ``cli`` or
``benchmark``. Importing this package imports no backend: ``fastrecloss._ops`` loads the one a
call asks for.
"""

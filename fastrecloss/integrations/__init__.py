"""Drop-in adapters that run other libraries' models on fastrecloss losses.

``recbole`` (``use_fastrecloss(model, loss=...)`` replaces a RecBole model's ``calculate_loss``)
and ``replay`` (``LossProto``-compatible losses for RePlay's ``replay.nn`` models); their sampled
pools come from the public ``fastrecloss.sampling``. Each adapter imports its library lazily (install
``fastrecloss[integrations]``) and never edits it. Everything here uses fastrecloss as a user
would — the public API only (``fastrecloss``, ``fastrecloss.functional``, ``fastrecloss.modules``
and the other public modules), never ``_problem``/``_spec``/``_ops``, ``backends``, ``kernels``,
``recsys`` or ``cli``.
"""

"""Reference recommender applications built on the public loss API.

Data loaders (``data``), sequence batching (``seqdata``), negative sampling (``sampling``: the
public ``fastrecloss.sampling`` samplers and the known pairs to exclude), full-ranking metrics
(``metrics``), the training loop with checkpoints (``training``), the models (``models/``: MF,
SASRec, ContrastVAE) and their trainers (``mf_train``, ``cvae_train``). Everything here uses
fastrecloss as a user would — the public API only (``fastrecloss``, ``fastrecloss.functional``,
``fastrecloss.modules`` and the other public modules), never ``_problem``/``_spec``/``_ops``,
``backends``, ``kernels`` or ``cli``.
"""

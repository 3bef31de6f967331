"""Models: the one layer interface (:class:`~cltunnel.models.layered.LayeredModel`), the registry of
architectures (:mod:`~cltunnel.models.zoo`), and surgery, the one place a model is cut at layer k."""

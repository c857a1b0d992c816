"""sparsejax: sparse, low-precision and analog-noise training in JAX.

Entry points: ``sparsejax.train.run(config)`` (also the ``sparsejax train`` command),
``sparsejax.config.load_config``, models in ``sparsejax.models`` built from
``sparsejax.nn`` layers.
"""

__version__ = "0.1.0"

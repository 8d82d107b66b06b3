"""seqio Task and Mixture registrations, installed as `elm_jax.tasks`.

Importing this package registers nothing; import the module you need, for
example `elm_jax.tasks.bigbench` (BIG-bench JSON tasks, registered at import
from the cached artifact) or `elm_jax.tasks.t0`.
"""

import envs_mjx  # noqa: F401  (sets the XLA CPU flags before jax starts)

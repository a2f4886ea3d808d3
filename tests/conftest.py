import envs_mjx  # noqa: F401  (sets the XLA CPU flags before jax starts)
from envs_mjx.xla_flags import enable_compilation_cache

# Compiled MJX programs are reused across test runs on the same machine (first run: tens of seconds each).
enable_compilation_cache()

"""cai-bootstrap, installed as the one package `cai_bootstrap`: this folder is the package, its rooms (core/, run/,
engine/, judge/, ...) its subpackages, so no generic top-level name reaches site-packages (pyproject.toml)."""

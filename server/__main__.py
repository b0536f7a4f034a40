"""python -m server: same as mlxkv serve."""

import sys

import mlxkv  # noqa: F401  (OpenBLAS before mlx)
from server.serve import main

sys.exit(main())

// Shared Metal helpers (see docs/kernels.md).

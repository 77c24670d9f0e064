"""Integrations of `crossflow_kernels` into other libraries' models, one module per library, each imported only when
used (`import crossflow_kernels.integrations.diffusers`): importing this package imports none of those libraries."""

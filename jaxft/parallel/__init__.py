"""Distribution: the device mesh and logical-axis rules (`sharding`), host-local batches made
global arrays (`batches`), and joining JAX's multi-controller runtime (`distributed`)."""

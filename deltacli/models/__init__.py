"""Base models: loading (local, Hub, embedded, GGUF, quantised), the table of architectures'
roles, the dtype a base is stored in, and checkpoint shards read tensor by tensor."""

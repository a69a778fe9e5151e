"""What tests and benchmarks share: free ports, isolated settings, deployments started through the CLI, metrics reading, processes and their sockets."""

"""Planning: error curves and allocation (ranks), measured layer times (latency), rank selection (plan)."""

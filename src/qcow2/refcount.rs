//! Refcount tables and blocks (qcow2.rst "Cluster refcounts"): reading a cluster's refcount.
